//! The kernel command line: what the host asks of this boot.

/// The values of every `fnvm.test=VALUE` parameter, in order.
pub fn test_actions(cmdline: &str) -> impl Iterator<Item = &str> {
    cmdline
        .split_ascii_whitespace()
        .filter_map(|param| param.strip_prefix("fnvm.test="))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_test_actions_in_order_and_ignores_the_rest() {
        let cmdline = "console=ttyS0 reboot=k fnvm.test=cpus panic=1 fnvm.test=write:/dev/vdb\n";
        let actions: Vec<_> = test_actions(cmdline).collect();
        assert_eq!(actions, ["cpus", "write:/dev/vdb"]);
    }

    #[test]
    fn a_similar_prefix_is_not_an_action() {
        assert_eq!(test_actions("fnvm.tests=cpus xfnvm.test=cpus").count(), 0);
    }
}
