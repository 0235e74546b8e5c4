//! The kernel command line: what the host asks of this boot, and what the kernel passed on.

/// Who started PID 1, judged from its arguments.
#[derive(Debug, PartialEq, Eq)]
pub enum Invocation<'a> {
    /// A VM boot. The kernel hands init every command-line word it does not know itself (and
    /// that has neither `=` nor `.`), e.g. a `nomodule` meant for another kernel: these are
    /// ignored with a warning, since PID 1 dying on them would panic the guest.
    Vm { ignored: &'a [String] },
    /// The process sandbox, which always starts the agent with `--` flags: parsed strictly.
    Host(&'a [String]),
}

/// How PID 1 was started: flags (`--…` first) come from the host, anything else from a kernel.
pub fn invocation(args: &[String]) -> Invocation<'_> {
    match args.first() {
        Some(first) if first.starts_with("--") => Invocation::Host(args),
        _ => Invocation::Vm { ignored: args },
    }
}

/// The value of the last `KEY=VALUE` parameter named `key` (the kernel's own rule: last wins).
pub fn value<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_ascii_whitespace()
        .rev()
        .filter_map(|param| param.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

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
    fn values_are_found_by_exact_key_last_one_winning() {
        let cmdline = "console=ttyS0 fnvm.rootfs=/dev/vda xfnvm.writable=/dev/x \
                       fnvm.writable=/dev/vdb fnvm.rootfs=/dev/vdc\n";
        assert_eq!(value(cmdline, "fnvm.rootfs"), Some("/dev/vdc"));
        assert_eq!(value(cmdline, "fnvm.writable"), Some("/dev/vdb"));
        assert_eq!(value(cmdline, "fnvm.test"), None);
        assert_eq!(value("fnvm.rootfs", "fnvm.rootfs"), None);
    }

    fn strings(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| w.to_string()).collect()
    }

    #[test]
    fn words_the_kernel_passed_on_are_a_vm_boot_and_flags_are_the_host() {
        assert_eq!(invocation(&[]), Invocation::Vm { ignored: &[] });
        let leftovers = strings(&["nomodule", "quiet"]);
        assert_eq!(
            invocation(&leftovers),
            Invocation::Vm {
                ignored: &leftovers
            }
        );
        let host = strings(&["--sandbox", "process", "--socket-dir", "/run/x"]);
        assert_eq!(invocation(&host), Invocation::Host(&host));
        let typo = strings(&["--sandbx", "process"]);
        assert_eq!(invocation(&typo), Invocation::Host(&typo));
    }

    #[test]
    fn a_similar_prefix_is_not_an_action() {
        assert_eq!(test_actions("fnvm.tests=cpus xfnvm.test=cpus").count(), 0);
    }
}
