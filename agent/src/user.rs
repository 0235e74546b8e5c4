//! The image's `User` (`name`, `uid`, `name:group`, `uid:gid`, and mixes), resolved the way OCI
//! runtimes do it: through the rootfs's own /etc/passwd and /etc/group, never the agent's.
//! A numeric uid missing from /etc/passwd is still valid (gid 0, home "/"); a name that is not
//! there is an error naming it.

/// Why the image's `User` names nobody the function can run as.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// The user name is not in the image's /etc/passwd.
    #[error("user {0:?} not found in the image's /etc/passwd")]
    NoSuchUser(String),
    /// `name:` with nothing after the colon.
    #[error("user {0:?} names an empty group")]
    EmptyGroup(String),
    /// The group name is not in the image's /etc/group.
    #[error("group {0:?} not found in the image's /etc/group")]
    NoSuchGroup(String),
}

/// Who the function's process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups: every /etc/group entry that lists the user's name.
    pub groups: Vec<u32>,
    /// For `HOME` when the environment has none.
    pub home: String,
}

struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

struct GroupEntry<'a> {
    name: &'a str,
    gid: u32,
    members: &'a str,
}

fn passwd_entries(text: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    text.lines().filter_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 7 || line.starts_with('#') {
            return None;
        }
        Some(PasswdEntry {
            name: f[0],
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
            home: f[5],
        })
    })
}

fn group_entries(text: &str) -> impl Iterator<Item = GroupEntry<'_>> {
    text.lines().filter_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 4 || line.starts_with('#') {
            return None;
        }
        Some(GroupEntry {
            name: f[0],
            gid: f[2].parse().ok()?,
            members: f[3],
        })
    })
}

/// Resolves `spec` (None or "" is root) against the rootfs's passwd and group files (None when
/// the image has none).
pub fn resolve(
    spec: Option<&str>,
    passwd: Option<&str>,
    group: Option<&str>,
) -> Result<ResolvedUser, UserError> {
    let spec = spec.unwrap_or("").trim();
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let passwd = passwd.unwrap_or("");
    let group = group.unwrap_or("");

    let user_part = if user_part.is_empty() { "0" } else { user_part };
    let entry = match user_part.parse::<u32>() {
        Ok(uid) => passwd_entries(passwd).find(|e| e.uid == uid),
        Err(_) => Some(
            passwd_entries(passwd)
                .find(|e| e.name == user_part)
                .ok_or_else(|| UserError::NoSuchUser(user_part.into()))?,
        ),
    };
    let (uid, mut gid, home, name) = match (&entry, user_part.parse::<u32>()) {
        (Some(e), _) => (e.uid, e.gid, e.home.to_string(), Some(e.name)),
        (None, Ok(uid)) => (uid, 0, "/".to_string(), None),
        (None, Err(_)) => unreachable!("a missing name returned above"),
    };

    if let Some(g) = group_part {
        if g.is_empty() {
            return Err(UserError::EmptyGroup(spec.into()));
        }
        gid = match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => group_entries(group)
                .find(|e| e.name == g)
                .map(|e| e.gid)
                .ok_or_else(|| UserError::NoSuchGroup(g.into()))?,
        };
    }

    let mut groups = Vec::new();
    if let Some(name) = name {
        for e in group_entries(group) {
            if e.members.split(',').any(|m| m.trim() == name) && !groups.contains(&e.gid) {
                groups.push(e.gid);
            }
        }
    }
    let home = if home.is_empty() { "/".into() } else { home };
    Ok(ResolvedUser {
        uid,
        gid,
        groups,
        home,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        # a comment\n\
        daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
        broken line\n\
        app:x:1000:1000::/home/app:/bin/sh\n\
        nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n";
    const GROUP: &str = "root:x:0:\n\
        daemon:x:1:\n\
        adm:x:4:app\n\
        staff:x:50:daemon, app\n\
        app:x:1000:\n\
        nogroup:x:65534:\n";

    fn r(spec: Option<&str>) -> Result<ResolvedUser, String> {
        resolve(spec, Some(PASSWD), Some(GROUP)).map_err(|e| e.to_string())
    }

    #[test]
    fn no_user_is_root() {
        let root = r(None).unwrap();
        assert_eq!((root.uid, root.gid, root.home.as_str()), (0, 0, "/root"));
        assert_eq!(r(Some("")).unwrap(), root);
        // Even with no passwd file at all.
        let bare = resolve(None, None, None).unwrap();
        assert_eq!((bare.uid, bare.gid, bare.home.as_str()), (0, 0, "/"));
    }

    #[test]
    fn a_name_gets_its_ids_home_and_supplementary_groups() {
        let app = r(Some("app")).unwrap();
        assert_eq!(
            app,
            ResolvedUser {
                uid: 1000,
                gid: 1000,
                groups: vec![4, 50],
                home: "/home/app".into()
            }
        );
    }

    #[test]
    fn a_uid_is_looked_up_and_may_be_unknown() {
        assert_eq!(r(Some("65534")).unwrap().home, "/nonexistent");
        let unknown = r(Some("4242")).unwrap();
        assert_eq!(
            (unknown.uid, unknown.gid, unknown.home.as_str()),
            (4242, 0, "/")
        );
        assert!(unknown.groups.is_empty());
    }

    #[test]
    fn groups_by_number_or_name() {
        let u = r(Some("1000:50")).unwrap();
        assert_eq!((u.uid, u.gid), (1000, 50));
        let u = r(Some("daemon:nogroup")).unwrap();
        assert_eq!((u.uid, u.gid, u.groups.as_slice()), (1, 65534, &[50][..]));
        let u = r(Some("4242:4343")).unwrap();
        assert_eq!((u.uid, u.gid), (4242, 4343));
    }

    #[test]
    fn unknown_names_are_errors_that_name_them() {
        let e = r(Some("ghost")).unwrap_err();
        assert!(e.contains("\"ghost\"") && e.contains("/etc/passwd"), "{e}");
        let e = r(Some("app:ghosts")).unwrap_err();
        assert!(e.contains("\"ghosts\"") && e.contains("/etc/group"), "{e}");
        assert!(r(Some("app:")).is_err());
        let e = resolve(Some("app"), None, None).unwrap_err().to_string();
        assert!(e.contains("\"app\""), "{e}");
    }
}
