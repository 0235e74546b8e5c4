//! The function's environment: the image's and the host's entries merged the way Docker does,
//! and the `PATH` a bare command name is looked up in.

/// What `PATH` is when the function's environment sets none (the OCI/Docker default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Why the environment cannot be given to the function.
#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    /// An entry has no `=`.
    #[error("environment entry {0:?} is not KEY=VALUE")]
    NotKeyValue(String),
    /// An entry starts with `=`.
    #[error("environment entry {0:?} has an empty name")]
    EmptyName(String),
}

/// The environment the function gets: `spec_env` with later entries replacing earlier ones of
/// the same name (in the first one's place), plus `PATH` and `HOME` when it sets neither.
pub fn final_env(spec_env: &[String], home: &str) -> Result<Vec<String>, EnvError> {
    let mut out: Vec<String> = Vec::with_capacity(spec_env.len() + 2);
    for entry in spec_env {
        let Some((key, _)) = entry.split_once('=') else {
            return Err(EnvError::NotKeyValue(entry.clone()));
        };
        if key.is_empty() {
            return Err(EnvError::EmptyName(entry.clone()));
        }
        match out
            .iter_mut()
            .find(|e| e.split_once('=').is_some_and(|(k, _)| k == key))
        {
            Some(existing) => *existing = entry.clone(),
            None => out.push(entry.clone()),
        }
    }
    let has = |out: &[String], key: &str| env_value(out, key).is_some();
    if !has(&out, "PATH") {
        out.push(format!("PATH={DEFAULT_PATH}"));
    }
    if !has(&out, "HOME") {
        out.push(format!("HOME={home}"));
    }
    Ok(out)
}

/// The `PATH` a bare command name is looked up in: the environment's, or the default.
pub(super) fn search_path(env: &[String]) -> &str {
    env_value(env, "PATH").unwrap_or(DEFAULT_PATH)
}

/// The value of the last `key=` entry of `env`.
fn env_value<'a>(env: &'a [String], key: &str) -> Option<&'a str> {
    env.iter()
        .rev()
        .filter_map(|e| e.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_is_deduplicated_last_wins_with_path_and_home_added() {
        let env: Vec<String> = ["A=1", "B=2", "A=3", "EMPTY="]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let out = final_env(&env, "/home/app").unwrap();
        assert_eq!(
            out,
            [
                "A=3".to_string(),
                "B=2".into(),
                "EMPTY=".into(),
                format!("PATH={DEFAULT_PATH}"),
                "HOME=/home/app".into()
            ]
        );
        let own: Vec<String> = vec!["PATH=/x".into(), "HOME=/h".into()];
        assert_eq!(final_env(&own, "/home/app").unwrap(), own);
        assert!(final_env(&["NOEQUALS".into()], "/")
            .unwrap_err()
            .to_string()
            .contains("NOEQUALS"));
        assert!(final_env(&["=x".into()], "/").is_err());
    }
}
