//! The egress tests' fixtures checked from the init namespace, the way a function's traffic
//! reaches them: test hosts (namespaces on veth links) and the real servers in them, the
//! netprobe image, and that dropping them leaves nothing behind. Root only (CI runs as root).

use std::io::Read as _;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use fnvm_testkit::{
    debian_netprobe_tarball, loud, netprobe_image, Dns, Iperf3, Postgres, TcpListen, TestHost,
};

fn is_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    loud("SKIPPED: the network fixtures need root (namespaces, veth links)");
    false
}

/// Connects to `addr:port` from the init namespace and reads until the peer closes.
fn read_from(addr: Ipv4Addr, port: u16) -> std::io::Result<String> {
    let target = SocketAddr::from((addr, port));
    let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(text)
}

/// What tells a test host from the next one in its slot (which another test, in this process
/// or another, may take the moment it is freed): the ifindex of its veth, which the init
/// namespace counts up, and the processes that ran in it.
struct Trace {
    name: String,
    outside: String,
    ifindex: String,
    processes: Vec<u32>,
}

fn ifindex(interface: &str) -> Option<String> {
    std::fs::read_to_string(format!("/sys/class/net/{interface}/ifindex")).ok()
}

fn netns_listed(name: &str) -> bool {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let list = String::from_utf8_lossy(&out.stdout).into_owned();
    list.lines()
        .any(|l| l.split_whitespace().next() == Some(name))
}

fn trace(host: &TestHost) -> Trace {
    let outside = host.host_interface();
    Trace {
        name: host.name().to_string(),
        ifindex: ifindex(&outside).expect("the host's veth"),
        outside,
        processes: host.processes().iter().map(|p| p.as_raw() as u32).collect(),
    }
}

/// Asserts the traced host is gone: its processes, its veth, its namespace (or, where its
/// slot was taken again, the new host's are there instead).
fn assert_gone(trace: &Trace) {
    wait_gone(&trace.processes);
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let veth = ifindex(&trace.outside);
        let retaken = veth.as_ref().is_some_and(|i| *i != trace.ifindex);
        if retaken || (veth.is_none() && !netns_listed(&trace.name)) {
            return;
        }
        // Its veth still there, or its namespace without one (or a new host half made).
        assert!(
            Instant::now() < deadline,
            "test host {} left behind: {} {}",
            trace.name,
            if veth.is_some() { "veth" } else { "no veth" },
            trace.outside
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether `pid` still exists as a process that has not exited (a zombie has).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let state = stat.rsplit_once(") ").map(|(_, rest)| rest.chars().next());
        !matches!(state, Some(Some('Z' | 'X')))
    })
}

fn wait_gone(pids: &[u32]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|&p| alive(p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let left: Vec<u32> = pids.iter().copied().filter(|&p| alive(p)).collect();
    assert!(left.is_empty(), "processes left behind: {left:?}");
}

#[test]
fn tcp_listen_says_hello_to_the_init_namespace() {
    if !is_root() {
        return;
    }
    let host = TestHost::new();
    let listen = TcpListen::start(&host, 8080);
    assert_eq!((listen.addr(), listen.port()), (host.addr(), 8080));
    assert_eq!(read_from(host.addr(), 8080).unwrap(), "hello\n");
    assert_eq!(read_from(host.addr(), 8080).unwrap(), "hello\n");
    assert_eq!(listen.accepted(), 2);
    // A port nobody listens on is refused (a reset from inside, not a timeout).
    let refused = read_from(host.addr(), 8081).unwrap_err();
    assert_eq!(
        refused.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "{refused}"
    );
    // Port 0: any free port.
    let any = TcpListen::start(&host, 0);
    assert_ne!(any.port(), 0);
    assert_eq!(read_from(host.addr(), any.port()).unwrap(), "hello\n");
}

#[test]
fn a_host_has_its_link_and_routes() {
    if !is_root() {
        return;
    }
    let host = TestHost::new();
    let inside = |args: &[&str]| {
        let out = host.command("ip").args(args).output().unwrap();
        assert!(out.status.success(), "ip {args:?} in {}", host.name());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let addrs = inside(&["-4", "-o", "addr"]);
    assert!(addrs.contains(&format!("{}/30", host.addr())), "{addrs}");
    assert!(addrs.contains("127.0.0.1/8"), "lo is up inside: {addrs}");
    let routes = inside(&["route"]);
    assert!(
        routes.contains(&format!("default via {}", host.gateway())),
        "{routes}"
    );
    let (gateway, addr) = (host.gateway().octets(), host.addr().octets());
    assert_eq!(gateway[3], 1);
    assert_eq!(addr[3], 2);
    assert_eq!(
        host.subnet(),
        format!("{}.{}.{}.0/30", addr[0], addr[1], addr[2])
    );
    let outside = std::fs::read_to_string(format!(
        "/sys/class/net/{}/operstate",
        host.host_interface()
    ))
    .expect("the host side of the veth is in the init namespace");
    assert_eq!(outside.trim(), "up");
}

#[test]
fn postgres_answers_psql_over_tcp() {
    if !is_root() {
        return;
    }
    let host = TestHost::new();
    let started = Instant::now();
    let pg = Postgres::start(&host);
    loud(&format!("Postgres::start took {:?}", started.elapsed()));
    assert_eq!(pg.addr(), host.addr());
    let out = Command::new("psql")
        .args(["-h", &pg.addr().to_string(), "-p", &pg.port().to_string()])
        .args(["-U", pg.user(), "-d", pg.dbname()])
        .args(["-Atc", "select text from greeting where id = 1"])
        .env("PGCONNECT_TIMEOUT", "5")
        .output()
        .expect("cannot run psql");
    assert!(
        out.status.success(),
        "psql over TCP failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "hello from postgres"
    );
    assert_eq!(pg.psql("select count(*) from greeting"), "1");
}

#[test]
fn dns_answers_its_records_and_nxdomain_otherwise() {
    if !is_root() {
        return;
    }
    let host = TestHost::new();
    let db = Ipv4Addr::new(10, 1, 2, 3);
    let web = Ipv4Addr::new(192, 0, 2, 80);
    let dns = Dns::start(&host, &[("db.fnvm.test", db), ("web.fnvm.test", web)]);
    let reply = dns.query("db.fnvm.test").unwrap();
    assert_eq!((reply.rcode, reply.addresses), (0, vec![db]));
    assert_eq!(dns.query("WEB.fnvm.test.").unwrap().addresses, vec![web]);
    let unknown = dns.query("nothing.fnvm.test").unwrap();
    assert_eq!((unknown.rcode, unknown.addresses), (3, vec![]), "NXDOMAIN");
    let log = dns.log();
    assert!(log.contains("query[A] nothing.fnvm.test"), "{log}");
}

#[test]
fn iperf3_serves_one_test_after_another() {
    if !is_root() {
        return;
    }
    let host = TestHost::new();
    let iperf = Iperf3::start(&host);
    for run in 0..2 {
        let out = Command::new("iperf3")
            .args([
                "-c",
                &iperf.addr().to_string(),
                "-p",
                &iperf.port().to_string(),
            ])
            .args(["-t", "1", "-J"])
            .output()
            .expect("cannot run iperf3");
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "iperf3 run {run} printed no JSON ({e}): {out:?}\nserver: {}",
                iperf.log()
            )
        });
        let bps = report["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap_or_else(|| panic!("iperf3 run {run} reported no throughput: {report}"));
        assert!(bps > 0.0, "iperf3 run {run}: {bps} bit/s");
        loud(&format!(
            "iperf3 over the veth, run {run}: {:.1} Gbit/s",
            bps / 1e9
        ));
    }
}

#[test]
fn two_hosts_at_once_get_their_own_subnets() {
    if !is_root() {
        return;
    }
    let (a, b) = (TestHost::new(), TestHost::new());
    assert_ne!(a.name(), b.name());
    assert_ne!(a.subnet(), b.subnet());
    assert_ne!(a.addr(), b.addr());
    let (la, lb) = (TcpListen::start(&a, 7000), TcpListen::start(&b, 7000));
    assert_eq!(read_from(a.addr(), 7000).unwrap(), "hello\n");
    assert_eq!(read_from(b.addr(), 7000).unwrap(), "hello\n");
    assert_eq!((la.accepted(), lb.accepted()), (1, 1));
}

#[test]
fn dropping_everything_leaves_nothing() {
    if !is_root() {
        return;
    }
    let host = TestHost::new();
    let pg = Postgres::start(&host);
    let dns = Dns::start(&host, &[("db.fnvm.test", pg.addr())]);
    let iperf = Iperf3::start(&host);
    let listen = TcpListen::start(&host, 7000);
    // One process the host alone knows of: its drop must kill it.
    let mut stray = host.command("sleep").arg("1000").spawn().unwrap();
    let trace = trace(&host);
    for pid in [pg.pid(), dns.pid(), iperf.pid(), stray.id()] {
        assert!(
            trace.processes.contains(&pid),
            "{pid} not among {:?}",
            trace.processes
        );
    }
    assert!(
        trace.processes.len() > 4,
        "postgres has its helper processes: {:?}",
        trace.processes
    );
    drop((pg, dns, iperf, listen));
    drop(host);
    let status = stray.wait().unwrap();
    assert!(!status.success(), "the stray sleep was killed: {status}");
    assert_gone(&trace);
}

#[test]
fn dropping_the_host_first_kills_its_servers() {
    if !is_root() {
        return;
    }
    let host = TestHost::new();
    let pg = Postgres::start(&host);
    let iperf = Iperf3::start(&host);
    let trace = trace(&host);
    drop(host);
    assert_gone(&trace);
    // The servers' own drops find them dead and still clean up.
    drop((pg, iperf));
}

/// Set for the child process [`a_crashed_tests_host_is_removed_by_the_next`] runs and kills.
const CRASH_HELPER: &str = "FNVM_NET_FIXTURES_CRASH_HELPER";

/// No check of its own: with CRASH_HELPER set, the test that crashes (a test host with
/// postgres in it, its name and postmaster's pid on stdout, then a wait for SIGKILL).
#[test]
fn crash_helper() {
    if std::env::var_os(CRASH_HELPER).is_none() {
        return;
    }
    let host = TestHost::new();
    let pg = Postgres::start(&host);
    println!("\ncrash-helper {} {}", host.name(), pg.pid());
    std::io::Write::flush(&mut std::io::stdout()).unwrap();
    std::thread::sleep(Duration::from_secs(600));
}

#[test]
fn a_crashed_tests_host_is_removed_by_the_next() {
    if !is_root() {
        return;
    }
    let mut helper = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "crash_helper",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CRASH_HELPER, "1")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = std::io::BufRead::lines(std::io::BufReader::new(helper.stdout.take().unwrap()));
    let line = stdout
        .map_while(Result::ok)
        .find_map(|l| l.strip_prefix("crash-helper ").map(str::to_string))
        .expect("the crash helper printed no host (see its output above)");
    let (name, pid) = line.split_once(' ').unwrap();
    let pid: u32 = pid.parse().unwrap();
    helper.kill().unwrap();
    helper.wait().unwrap();
    assert!(
        netns_listed(name),
        "the crashed test's {name} is gone before any cleaning"
    );
    assert!(alive(pid), "the crashed test's postgres died with it");
    // New hosts take the lowest free slot: take slots until the crashed one (or one past it,
    // when another test got there first and did the cleaning).
    let slot = |name: &str| -> u32 { name.trim_start_matches("fnvm-t-").parse().unwrap() };
    let mut hosts = Vec::new();
    while hosts
        .last()
        .is_none_or(|h: &TestHost| slot(h.name()) < slot(name))
    {
        hosts.push(TestHost::new());
    }
    wait_gone(&[pid]);
    let prefix = format!("{name}-");
    let dirs: Vec<String> = std::fs::read_dir("/tmp")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&prefix))
        .collect();
    if slot(hosts.last().unwrap().name()) == slot(name) {
        assert!(
            dirs.is_empty(),
            "the crashed test's directories are left: {dirs:?}"
        );
    }
}

/// Where the whole-system tests keep their image layouts (fnvm's tests: `Here::layouts`).
fn layouts() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("run-tests-images")
}

#[test]
fn netprobe_image_is_an_oci_layout() {
    let started = Instant::now();
    let reference = netprobe_image(&layouts());
    loud(&format!("netprobe_image took {:?}", started.elapsed()));
    let dir = reference
        .strip_prefix("oci:")
        .and_then(|r| r.strip_suffix(":latest"))
        .unwrap_or_else(|| panic!("not an oci:DIR:latest reference: {reference}"));
    assert!(
        Path::new(dir).join("index.json").is_file(),
        "{dir}/index.json"
    );
    assert!(
        Path::new(dir).join("oci-layout").is_file(),
        "{dir}/oci-layout"
    );
}

/// The netprobe server in the image's own userspace (its tarball, chrooted) inside a test host,
/// asked from the init namespace about the servers beside it.
#[test]
fn netprobe_probes_the_servers_beside_it() {
    if !is_root() {
        return;
    }
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("netprobe-root-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let _remove = RemoveOnDrop(root.clone());
    let status = Command::new("tar")
        .arg("-xf")
        .arg(debian_netprobe_tarball())
        .arg("-C")
        .arg(&root)
        .status()
        .unwrap();
    assert!(status.success(), "unpacking the netprobe tarball");
    std::fs::create_dir_all(root.join("srv")).unwrap();
    std::fs::write(root.join("srv/netprobe.py"), fnvm_testkit::NETPROBE_SERVER).unwrap();

    let host = TestHost::new();
    let pg = Postgres::start(&host);
    let dns = Dns::start(&host, &[("db.fnvm.test", pg.addr())]);
    let iperf = Iperf3::start(&host);
    let listen = TcpListen::start(&host, 7000);
    std::fs::write(
        root.join("etc/resolv.conf"),
        format!("nameserver {}\n", dns.addr()),
    )
    .unwrap();
    // /proc and the namespace's own /sys in a mount namespace of the probe's, gone with it.
    let script = r#"mount -t proc proc "$0/proc" && mount -t sysfs sysfs "$0/sys" &&
        exec chroot "$0" python3 -u /srv/netprobe.py"#;
    let mut probe = host
        .command("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", script])
        .arg(&root)
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .spawn()
        .unwrap();
    let url = format!("http://{}:9000/event-invoke", host.addr());
    let http = fnvm_testkit::http();
    let deadline = Instant::now() + Duration::from_secs(20);
    while http.get(&url).call().is_err() {
        assert!(
            Instant::now() < deadline,
            "netprobe did not answer within 20 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let ask = |op: serde_json::Value| -> serde_json::Value {
        let mut reply = http.post(&url).send(op.to_string()).unwrap();
        let text = reply.body_mut().read_to_string().unwrap();
        assert_eq!(reply.status(), 200, "{op}: {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{op}: {e}: {text}"))
    };
    let a = host.addr().to_string();

    let ok = ask(serde_json::json!({"op": "connect", "host": a, "port": listen.port()}));
    assert_eq!(ok["ok"], true, "{ok}");
    let refused = ask(serde_json::json!({"op": "connect", "host": a, "port": 7001}));
    assert_eq!(
        (&refused["ok"], &refused["kind"]),
        (&false.into(), &"refused".into())
    );
    let resolved = ask(serde_json::json!({"op": "resolve", "name": "db.fnvm.test"}));
    assert_eq!(resolved["addresses"], serde_json::json!([a]), "{resolved}");
    let missing = ask(serde_json::json!({"op": "resolve", "name": "nope.fnvm.test"}));
    assert_eq!(missing["ok"], false, "{missing}");
    let sql = ask(
        serde_json::json!({"op": "psql", "host": "db.fnvm.test", "port": pg.port(),
        "user": pg.user(), "dbname": pg.dbname(), "sql": "select text from greeting"}),
    );
    assert_eq!(sql["ok"], true, "{sql}");
    assert_eq!(
        sql["stdout"].as_str().unwrap().trim(),
        "hello from postgres"
    );
    let perf = ask(
        serde_json::json!({"op": "iperf3", "host": a, "port": iperf.port(),
        "seconds": 1, "reverse": true}),
    );
    assert!(perf["received_bps"].as_f64().unwrap_or(0.0) > 0.0, "{perf}");
    let latency = ask(serde_json::json!({"op": "connect_latency", "host": a,
        "port": listen.port(), "count": 5}));
    assert_eq!(latency["samples"], 5, "{latency}");
    let ifaces = ask(serde_json::json!({"op": "interfaces"}));
    let veth = host.host_interface().replace('h', "n");
    let names = ifaces["interfaces"].as_array().unwrap();
    for name in ["lo", veth.as_str()] {
        assert!(names.iter().any(|n| n == name), "{name} in {ifaces}");
    }
    let resolv = ask(serde_json::json!({"op": "file", "path": "/etc/resolv.conf"}));
    assert_eq!(resolv["text"], format!("nameserver {}\n", dns.addr()));
    let bad = http.post(&url).send("not json").unwrap();
    assert_eq!(bad.status(), 400);

    drop(host);
    let _ = probe.wait();
    drop((pg, dns, iperf, listen));
}

/// Removes a directory when dropped (the test passed or not).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
