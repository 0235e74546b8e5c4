//! Tree parity with umoci: every entry's type, mode, owner, size, link target and mtime.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use anyhow::{bail, Result};

/// Every entry below `root`: type, mode, owner, size (files), link target, mtime.
pub(crate) fn listing(root: &Path) -> Result<BTreeMap<String, String>> {
    use std::os::unix::fs::MetadataExt;
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            let m = fs::symlink_metadata(&path)?;
            let ft = m.file_type();
            let what = if ft.is_dir() {
                stack.push(path.clone());
                "dir".to_owned()
            } else if ft.is_symlink() {
                format!("link {}", fs::read_link(&path)?.display())
            } else if ft.is_file() {
                format!("file {}", m.len())
            } else {
                format!("special {:x}", m.rdev())
            };
            let rel = path.strip_prefix(root)?.display().to_string();
            out.insert(
                rel,
                format!(
                    "{what} {:o} {}:{} {}",
                    m.mode(),
                    m.uid(),
                    m.gid(),
                    m.mtime()
                ),
            );
        }
    }
    Ok(out)
}

/// Ok(entries) when equal, else the first differences.
pub(crate) fn compare(
    ours: &BTreeMap<String, String>,
    theirs: &BTreeMap<String, String>,
) -> Result<usize> {
    let mut diff = Vec::new();
    for (k, v) in ours {
        match theirs.get(k) {
            Some(t) if t == v => {}
            Some(t) => diff.push(format!("  {k}: fnvm {v} / umoci {t}")),
            None => diff.push(format!("  {k}: only in fnvm ({v})")),
        }
    }
    for (k, t) in theirs {
        if !ours.contains_key(k) {
            diff.push(format!("  {k}: only in umoci ({t})"));
        }
    }
    if diff.is_empty() {
        Ok(ours.len())
    } else {
        diff.truncate(20);
        bail!("{}", diff.join("\n"))
    }
}
