//! Network egress of VM functions end to end (issue 15): `fnvm run --sandbox vm` with the
//! netprobe image (python3, psql) against real servers in a test host (a network namespace on a
//! veth link, [`TestHost`]). Checked as a user would see it, through the function's own
//! replies: it resolves a name with the `Dns` given to `fnvm run --dns`, queries `Postgres` by
//! that name and returns the row; the metadata address, the host's own address and a denied
//! range are never reached (refused on the host, and "connection refused" in the guest: see
//! [`assert_refused`]); `--network none` has only `lo`; a snapshot start reaches Postgres
//! again through a new passt. After each run nothing is left: no passt, no rules of its uid in
//! `table inet fnvm_egress`, no uid directory.
//!
//! Linux guests need hardware virtualization: where /proc/cpuinfo shows no vmx/svm each test
//! prints one loud SKIPPED line and returns; scripts/test.sh runs them at the nested level.
//! Needs root (test hosts, nft), passt and nft. passt needs a default route to pick its
//! interface (the nested level's L1 has one on a dummy uplink): on a host without one the tests
//! route by default through the test host's link (said loudly), and remove that route again.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use fnvm_testkit::*;

const HERE: Here = fnvm_testkit::here!();
/// A hang guard under emulation (the netprobe image's rootfs is built on the first run).
const START_LIMIT: Duration = Duration::from_secs(300);
/// The name the test host's DNS server gives Postgres.
const DB_NAME: &str = "db.egress-vm.test";
/// Where fnvm keeps egress uid slots (src/network/uid.rs).
const UID_DIR: &str = "/run/fnvm/egress-uids";
/// The first egress uid.
const UID_BASE: u32 = 0x2f00_0000;
const SQL: &str = "select text from greeting where id = 1";

/// One home for the whole test binary (the tests run one at a time): the image is pulled and
/// its rootfs built once, which under emulation takes minutes. Fresh per test process.
fn home() -> PathBuf {
    static HOME: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    HOME.get_or_init(|| HERE.fresh_home("egress-vm")).clone()
}

fn skip(test: &str) -> bool {
    !linux_guests_run_here(&format!("VM egress: {test}"))
}

/// A test host with Postgres and a DNS server naming it, and (where the host has none) a
/// default route through its link for as long as it lives.
struct Peers {
    pg: Postgres,
    dns: Dns,
    route: Option<String>,
    host: TestHost,
}

impl Peers {
    fn start() -> Peers {
        let host = TestHost::new();
        let pg = Postgres::start(&host);
        let dns = Dns::start(&host, &[(DB_NAME, pg.addr())]);
        let route = match has_default_route() {
            true => None,
            false => {
                let via = format!("default via {} dev {}", host.addr(), host.host_interface());
                loud(&format!(
                    "egress_vm: this host has no default route and passt needs one: adding \
                     `ip route add {via}` for this test"
                ));
                ip(&format!("route add {via}"));
                Some(via)
            }
        };
        Peers {
            pg,
            dns,
            route,
            host,
        }
    }
}

impl Drop for Peers {
    fn drop(&mut self) {
        if let Some(via) = self.route.take() {
            ip(&format!("route del {via}"));
        }
    }
}

fn has_default_route() -> bool {
    std::fs::read_to_string("/proc/net/route")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .any(|l| l.split_whitespace().nth(1) == Some("00000000"))
}

fn ip(args: &str) {
    let out = Command::new("ip")
        .args(args.split_whitespace())
        .output()
        .expect("ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn run_netprobe(home: &Path, args: &[&str]) -> FnvmRun {
    let image = netprobe_image(&HERE.layouts());
    // Under emulation a psql start alone takes seconds: the default 3 s timeout is too short.
    let mut all = vec![
        "--sandbox",
        "vm",
        "--type",
        "web",
        "--memory",
        "256",
        "--timeout",
        "120",
    ];
    all.extend_from_slice(args);
    let run = FnvmRun::start(HERE.fnvm(), home, HERE.agent(), &image, &all, START_LIMIT);
    run.expect_serving();
    run
}

/// The function's JSON reply to the probe `request`.
fn probe(run: &FnvmRun, request: serde_json::Value) -> serde_json::Value {
    let mut resp = http()
        .post(&run.url("/"))
        .header("Content-Type", "application/json")
        .send(request.to_string())
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap();
    assert_eq!(status, 200, "{request}: {text}\n{}", diagnostics(run));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// What to look at when a probe fails: fnvm's last lines, passt's messages, the host table.
fn diagnostics(run: &FnvmRun) -> String {
    let id = run.instance_id.clone().unwrap_or_default();
    let passt = run.home.join("instances").join(&id).join("passt.err");
    let lines = run.stderr.snapshot();
    format!(
        "fnvm's stderr (last 40 lines):\n{}\npasst's messages: {}\ntable inet fnvm_egress:\n{}",
        lines[lines.len().saturating_sub(40)..].join("\n"),
        std::fs::read_to_string(&passt).unwrap_or_else(|e| format!("({}: {e})", passt.display())),
        egress_table()
    )
}

fn connect(run: &FnvmRun, host: &str, port: u16) -> serde_json::Value {
    probe(
        run,
        serde_json::json!({"op": "connect", "host": host, "port": port, "timeout_s": 5}),
    )
}

/// Asserts the function cannot connect to `host:port` and is told so at once: its connect
/// fails with "connection refused", not a timeout. (Debian 12's passt answers a SYN the host
/// refused with a bare RST, which a guest in SYN-SENT would drop; fnvm-vmm's virtio-net sends
/// it on as the RST+ACK a refusing host sends.) Each case is a destination that does accept
/// connections, or answers at once, without the rules: see the callers.
fn assert_refused(run: &FnvmRun, host: &str, port: u16) {
    let reply = connect(run, host, port);
    assert_eq!(reply["ok"], false, "{host}:{port} was reached: {reply}");
    assert_eq!(
        reply["kind"], "refused",
        "{host}:{port} must be refused, not time out: {reply}"
    );
}

fn psql(run: &FnvmRun, peers: &Peers, host: &str) -> serde_json::Value {
    probe(
        run,
        serde_json::json!({"op": "psql", "host": host, "port": peers.pg.port(),
            "user": peers.pg.user(), "dbname": peers.pg.dbname(), "sql": SQL}),
    )
}

/// The instance's egress uid, from its record.
fn egress_uid(run: &FnvmRun) -> u32 {
    let id = run.instance_id.clone().expect("an instance id");
    let record = run.home.join("instances").join(&id).join("instance.json");
    let text =
        std::fs::read_to_string(&record).unwrap_or_else(|e| panic!("{}: {e}", record.display()));
    let record: serde_json::Value = serde_json::from_str(&text).unwrap();
    let uid = record["egress_uid"]
        .as_u64()
        .unwrap_or_else(|| panic!("no egress uid in {text}")) as u32;
    assert!((UID_BASE..UID_BASE + 65536).contains(&uid), "{uid}");
    uid
}

/// The processes running as `uid`, with their command lines.
fn processes_of(uid: u32) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let real = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|v| v.split_whitespace().next().map(str::to_string));
        let zombie = status
            .lines()
            .any(|l| l.starts_with("State:") && l.contains('Z'));
        if !zombie && real == Some(uid.to_string()) {
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            found.push(String::from_utf8_lossy(&cmdline).replace('\0', " "));
        }
    }
    found
}

fn egress_table() -> String {
    let out = Command::new("nft")
        .args(["list", "table", "inet", "fnvm_egress"])
        .output()
        .expect("nft");
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// While the instance runs: its passt runs as its uid, and the host table sends the uid's
/// packets to the instance's chain.
fn assert_egress_in_place(uid: u32) {
    let procs = processes_of(uid);
    assert!(
        procs.iter().any(|c| c.starts_with("passt ")),
        "no passt runs as uid {uid}: {procs:?}"
    );
    let table = egress_table();
    assert!(
        table.contains(&format!("{uid} : goto i{uid}"))
            && table.contains(&format!("chain i{uid} {{")),
        "no rules for uid {uid}:\n{table}"
    );
}

/// Stops the run (Ctrl-C) and asserts nothing of the instance or its egress is left.
fn stop(mut run: FnvmRun, uid: Option<u32>) {
    let id = run.instance_id.clone().expect("an instance id");
    let rootfs = rootfs_image_of(&run);
    let status = run.interrupt(Duration::from_secs(60));
    assert!(
        status.success(),
        "fnvm run exited with {status}:\n{}",
        run.stderr.snapshot().join("\n")
    );
    assert_nothing_left(&run.home, &id, rootfs.as_deref());
    if let Some(uid) = uid {
        assert_eq!(
            processes_of(uid),
            Vec::<String>::new(),
            "left running as {uid}"
        );
        let table = egress_table();
        assert!(
            !table.contains(&format!("i{uid}")),
            "rules of uid {uid} are left:\n{table}"
        );
        let slot = PathBuf::from(UID_DIR).join((uid - UID_BASE).to_string());
        assert!(!slot.exists(), "{} is left", slot.display());
    }
}

#[test]
fn a_vm_function_queries_postgres_by_name_and_is_refused_the_host_and_the_metadata_address() {
    let test =
        "a_vm_function_queries_postgres_by_name_and_is_refused_the_host_and_the_metadata_address";
    if skip(test) {
        return;
    }
    let _serial = serial();
    let peers = Peers::start();
    let home = home();
    let dns = peers.dns.addr().to_string();
    let run = run_netprobe(&home, &["--dns", &dns]);
    let uid = egress_uid(&run);
    assert_egress_in_place(uid);

    // The guest's resolver is the user-mode stack's, forwarded to the test host's server.
    let resolv = probe(
        &run,
        serde_json::json!({"op": "file", "path": "/etc/resolv.conf"}),
    );
    assert!(
        resolv["text"]
            .as_str()
            .unwrap_or("")
            .contains("nameserver 10.0.2.3"),
        "{resolv}"
    );
    // Postgres by its address, then by its name.
    let direct = connect(&run, &peers.pg.addr().to_string(), peers.pg.port());
    let route = probe(
        &run,
        serde_json::json!({"op": "file", "path": "/proc/net/route"}),
    );
    assert_eq!(
        direct["ok"],
        true,
        "{direct}\nthe guest's routes: {route}\n{}",
        diagnostics(&run)
    );
    let resolved = probe(&run, serde_json::json!({"op": "resolve", "name": DB_NAME}));
    assert_eq!(
        resolved["addresses"],
        serde_json::json!([peers.pg.addr().to_string()]),
        "{resolved}\n{}",
        diagnostics(&run)
    );
    let row = psql(&run, &peers, DB_NAME);
    assert_eq!(row["ok"], true, "{row}");
    assert_eq!(
        row["stdout"].as_str().unwrap().trim(),
        "hello from postgres",
        "{row}"
    );

    // The host's own address facing the test host: a listener there is not the function's.
    let host_side: TcpListener = TcpListener::bind((peers.host.gateway(), 0)).unwrap();
    let port = host_side.local_addr().unwrap().port();
    assert_refused(&run, &peers.host.gateway().to_string(), port);
    assert_refused(&run, "169.254.169.254", 80);
    let ifaces = probe(&run, serde_json::json!({"op": "interfaces"}));
    let names = ifaces["interfaces"].as_array().unwrap();
    assert!(names.contains(&serde_json::json!("eth0")), "{ifaces}");
    stop(run, Some(uid));
}

#[test]
fn a_denied_range_is_refused_at_once() {
    if skip("a_denied_range_is_refused_at_once") {
        return;
    }
    let _serial = serial();
    let peers = Peers::start();
    let home = home();
    let subnet = peers.host.subnet();
    let dns = peers.dns.addr().to_string();
    let run = run_netprobe(&home, &["--dns", &dns, "--egress-deny", &subnet]);
    let uid = egress_uid(&run);
    assert_refused(&run, &peers.pg.addr().to_string(), peers.pg.port());
    stop(run, Some(uid));
}

#[test]
fn a_vm_function_without_network_has_only_loopback() {
    if skip("a_vm_function_without_network_has_only_loopback") {
        return;
    }
    let _serial = serial();
    let home = home();
    let run = run_netprobe(&home, &["--network", "none"]);
    // No network device: loopback only, besides the inert fallback tunnel (sit0) that the
    // guest kernel's built-in IPv6-in-IPv4 support always makes (no address, no route).
    let ifaces = probe(&run, serde_json::json!({"op": "interfaces"}));
    let names: Vec<&str> = ifaces["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n.as_str())
        .filter(|n| *n != "sit0")
        .collect();
    assert_eq!(names, ["lo"], "{ifaces}");
    let id = run.instance_id.clone().unwrap();
    let record =
        std::fs::read_to_string(home.join("instances").join(&id).join("instance.json")).unwrap();
    assert!(!record.contains("egress_uid"), "{record}");
    stop(run, None);
}

#[test]
fn a_snapshot_start_reaches_postgres_through_a_new_passt() {
    if skip("a_snapshot_start_reaches_postgres_through_a_new_passt") {
        return;
    }
    let _serial = serial();
    let peers = Peers::start();
    let home = home();
    let dns = peers.dns.addr().to_string();
    let args = ["--dns", dns.as_str(), "--snapshot"];
    let first = run_netprobe(&home, &args);
    assert!(
        first
            .stderr
            .wait_for(Duration::from_secs(5), |l| l
                .contains("snapshot written for later starts"))
            .is_some(),
        "{}",
        first.stderr.snapshot().join("\n")
    );
    let first_uid = egress_uid(&first);
    stop(first, Some(first_uid));

    let second = run_netprobe(&home, &args);
    assert!(
        second
            .stderr
            .wait_for(Duration::from_secs(5), |l| l
                .contains("(snapshot start, vm sandbox)"))
            .is_some(),
        "{}",
        second.stderr.snapshot().join("\n")
    );
    let uid = egress_uid(&second);
    assert_egress_in_place(uid);
    let row = psql(&second, &peers, DB_NAME);
    assert_eq!(row["ok"], true, "{row}");
    assert_eq!(
        row["stdout"].as_str().unwrap().trim(),
        "hello from postgres",
        "{row}"
    );
    // The restored guest's address is the one it had; the policy is the new instance's.
    assert_refused(&second, "169.254.169.254", 80);
    stop(second, Some(uid));
}
