//! Functions reach the network (process sandbox; the vm sandbox's twin is `egress_vm.rs`):
//! real servers in test hosts of the test's own making (network namespaces joined by veth),
//! reached from inside a function built from Debian packages (`netprobe`: python3, psql,
//! iperf3), through `fnvm run` and `fnvm serve`. Needs root.
//!
//! What a user would notice: the function queries PostgreSQL by a name a DNS server in another
//! host answers; the host's own addresses, the gateway and 169.254.169.254 are refused at once;
//! `--egress-deny`/`--egress-allow` hold; `--network none` leaves loopback only; and once the
//! function stops nothing of its network is left (no pasta, no namespace).

use std::net::{Ipv4Addr, TcpListener};
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use fnvm_testkit::nethost::TestHost;
use fnvm_testkit::registry::{Registry, RegistryConfig};
use fnvm_testkit::servers::{Dns, Postgres, TcpListen};
use fnvm_testkit::{
    assert_nothing_left, http, loud, netprobe_image, rootfs_image_of, FnvmRun, Here, Serve,
};

const HERE: Here = fnvm_testkit::here!();
const START_LIMIT: Duration = Duration::from_secs(60);
/// A refused connection comes back at once; a dropped one would take the probe's timeout (5 s).
const FAST: f64 = 1000.0;

/// Whether the process sandbox runs at this level (it needs root).
fn runs_here(test: &str) -> bool {
    if !nix::unistd::geteuid().is_root() {
        loud(&format!(
            "SKIPPED: {test}: needs root (network namespaces, pasta, nft)"
        ));
        return false;
    }
    // FNVM_TEST_SANDBOXES names the sandboxes a level tests (the nested level: vm only).
    if std::env::var("FNVM_TEST_SANDBOXES").is_ok_and(|s| !s.split(',').any(|k| k == "process")) {
        loud(&format!(
            "SKIPPED: {test}: FNVM_TEST_SANDBOXES leaves the process sandbox out here; the vm \
             sandbox's egress is tests/egress_vm.rs"
        ));
        return false;
    }
    true
}

/// `fnvm run` of the netprobe function in the process sandbox with `args`.
fn start(home: &str, args: &[&str]) -> FnvmRun {
    let home = HERE.fresh_home(home);
    let image = netprobe_image(&HERE.layouts());
    let mut all = vec!["--sandbox", "process", "--timeout", "30"];
    all.extend_from_slice(args);
    let run = FnvmRun::start(HERE.fnvm(), &home, HERE.agent(), &image, &all, START_LIMIT);
    run.expect_serving();
    run
}

/// One netprobe operation, as an event invocation.
fn probe(run: &FnvmRun, op: Value) -> Value {
    let mut resp = http()
        .post(run.url("/"))
        .send(op.to_string().as_bytes())
        .unwrap_or_else(|e| panic!("invoking netprobe with {op}: {e}"));
    let text = resp.body_mut().read_to_string().unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("netprobe's answer {text:?}: {e}"))
}

fn connect(run: &FnvmRun, host: impl ToString, port: u16) -> Value {
    probe(
        run,
        json!({"op": "connect", "host": host.to_string(), "port": port, "timeout_s": 5}),
    )
}

/// Asserts a connection was refused at once, not dropped into a timeout.
fn assert_refused_fast(answer: &Value, what: &str) {
    assert_eq!(answer["ok"], false, "{what} was reachable: {answer}");
    assert_eq!(answer["kind"], "refused", "{what}: {answer}");
    let ms = answer["ms"].as_f64().unwrap();
    assert!(ms < FAST, "{what} took {ms} ms to be refused: {answer}");
}

/// Stops the run and checks nothing of the instance is left, its pasta included.
fn stop_and_check(mut run: FnvmRun) {
    let id = run.instance_id.clone().expect("the run names its instance");
    let rootfs = rootfs_image_of(&run);
    let status = run.interrupt(Duration::from_secs(30));
    assert!(status.success(), "fnvm run ended with {status}");
    assert_nothing_left(&run.home, &id, rootfs.as_deref());
    let pastas = processes_naming(&id, "pasta");
    assert!(pastas.is_empty(), "pasta of {id} left running: {pastas:?}");
}

/// Processes whose command line names `program` and `needle`.
fn processes_naming(needle: &str, program: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(needle) && c.split(' ').next().is_some_and(|p| p.ends_with(program)))
        .collect()
}

#[test]
fn a_function_queries_postgres_in_another_host_by_the_name_its_dns_serves() {
    if !runs_here("a_function_queries_postgres_in_another_host_by_the_name_its_dns_serves") {
        return;
    }
    let db = TestHost::new();
    let postgres = Postgres::start(&db);
    let names = TestHost::new();
    let dns = Dns::start(&names, &[("db.fnvm.test", db.addr())]);
    let dns_addr = dns.addr().to_string();
    let run = start("egress-postgres", &["--dns", &dns_addr]);

    let conf = probe(&run, json!({"op": "file", "path": "/etc/resolv.conf"}));
    assert!(
        conf["text"]
            .as_str()
            .unwrap()
            .contains("nameserver 10.0.2.3"),
        "{conf}"
    );
    let resolved = probe(&run, json!({"op": "resolve", "name": "db.fnvm.test"}));
    assert_eq!(
        resolved["addresses"],
        json!([db.addr().to_string()]),
        "{resolved}"
    );
    assert!(
        dns.log().contains("db.fnvm.test"),
        "the query reached the test's DNS server: {}",
        dns.log()
    );
    let row = probe(
        &run,
        json!({"op": "psql", "host": "db.fnvm.test", "port": postgres.port(),
               "user": postgres.user(), "dbname": postgres.dbname(),
               "sql": "select text from greeting where id = 1"}),
    );
    assert_eq!(row["ok"], true, "{row}\npostgres log:\n{}", postgres.log());
    assert_eq!(
        row["stdout"].as_str().unwrap().trim(),
        "hello from postgres"
    );
    let interfaces = probe(&run, json!({"op": "interfaces"}));
    assert_eq!(
        interfaces["interfaces"],
        json!(["eth0", "lo"]),
        "{interfaces}"
    );
    stop_and_check(run);
}

#[test]
fn the_hosts_own_addresses_the_gateway_and_metadata_are_refused_at_once() {
    if !runs_here("the_hosts_own_addresses_the_gateway_and_metadata_are_refused_at_once") {
        return;
    }
    let peer = TestHost::new();
    let open = TcpListen::start(&peer, 0);
    // A service of the host's, on every address (as a registry or an API bound to 0.0.0.0 is).
    let service = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
    let port = service.local_addr().unwrap().port();
    let run = start("egress-refused", &[]);

    let reached = connect(&run, open.addr(), open.port());
    assert_eq!(reached["ok"], true, "the test host is reachable: {reached}");
    assert_refused_fast(
        &connect(&run, peer.gateway(), port),
        "the host's address facing the test host",
    );
    assert_refused_fast(&connect(&run, "10.0.2.2", port), "the gateway");
    assert_refused_fast(
        &connect(&run, "169.254.169.254", 80),
        "the metadata address",
    );
    // fnvm's own front listens on the host's loopback; the function's loopback is its own.
    let front = run.expect_serving().port();
    assert_refused_fast(
        &connect(&run, "127.0.0.1", front),
        "fnvm's front on loopback",
    );
    for addr in host_ipv4_addresses() {
        assert_refused_fast(
            &connect(&run, addr, port),
            &format!("the host's address {addr}"),
        );
    }
    stop_and_check(run);
}

/// The host's IPv4 addresses (`ip -4 -o addr`).
fn host_ipv4_addresses() -> Vec<Ipv4Addr> {
    let out = std::process::Command::new("ip")
        .args(["-4", "-o", "addr", "show"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .filter_map(|a| a.split('/').next()?.parse().ok())
        .collect()
}

#[test]
fn a_denied_range_is_refused_and_an_allow_list_leaves_only_its_ranges() {
    if !runs_here("a_denied_range_is_refused_and_an_allow_list_leaves_only_its_ranges") {
        return;
    }
    let a = TestHost::new();
    let b = TestHost::new();
    let (on_a, on_b) = (TcpListen::start(&a, 0), TcpListen::start(&b, 0));

    let run = start("egress-deny", &["--egress-deny", &a.subnet()]);
    assert_refused_fast(&connect(&run, on_a.addr(), on_a.port()), "a denied range");
    assert_eq!(connect(&run, on_b.addr(), on_b.port())["ok"], true);
    stop_and_check(run);

    let run = start("egress-allow", &["--egress-allow", &b.subnet()]);
    assert_refused_fast(
        &connect(&run, on_a.addr(), on_a.port()),
        "a range not allowed",
    );
    assert_eq!(connect(&run, on_b.addr(), on_b.port())["ok"], true);
    stop_and_check(run);
    assert_eq!(on_a.accepted(), 0, "nothing reached the refused host");
}

#[test]
fn network_none_leaves_loopback_only_and_the_images_resolv_conf() {
    if !runs_here("network_none_leaves_loopback_only_and_the_images_resolv_conf") {
        return;
    }
    let peer = TestHost::new();
    let open = TcpListen::start(&peer, 0);
    let run = start("egress-none", &["--network", "none"]);
    let interfaces = probe(&run, json!({"op": "interfaces"}));
    assert_eq!(interfaces["interfaces"], json!(["lo"]), "{interfaces}");
    let answer = connect(&run, open.addr(), open.port());
    assert_eq!(answer["ok"], false, "{answer}");
    assert_eq!(answer["kind"], "unreachable", "{answer}");
    let conf = probe(&run, json!({"op": "file", "path": "/etc/resolv.conf"}));
    assert!(
        !conf.to_string().contains("written by fnvm"),
        "a function without a network keeps the image's resolv.conf: {conf}"
    );
    stop_and_check(run);
}

#[test]
fn bad_network_flags_are_refused_before_anything_runs() {
    if !runs_here("bad_network_flags_are_refused_before_anything_runs") {
        return;
    }
    let home = HERE.fresh_home("egress-bad-flags");
    let image = netprobe_image(&HERE.layouts());
    for (args, expected) in [
        (
            vec!["--egress-deny", "10.1.2.3/8"],
            "--egress-deny 10.1.2.3/8: bits are set past the /8 prefix; did you mean 10.0.0.0/8?",
        ),
        (
            vec!["--egress-allow", "169.254.169.254"],
            "it lies in 169.254.0.0/16 (link-local and cloud metadata addresses), which functions never reach",
        ),
        (
            vec!["--network", "none", "--egress-deny", "10.0.0.0/8"],
            "--egress-deny and --egress-allow need --network egress",
        ),
    ] {
        let out = fnvm_testkit::fnvm_command(HERE.fnvm(), &home, HERE.agent())
            .args(["run", &image, "--sandbox", "process", "--listen", "127.0.0.1:0"])
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!stderr.contains("pulled"), "refused before the pull: {stderr}");
    }
    assert!(!Path::new(&home.join("instances"))
        .read_dir()
        .is_ok_and(|mut d| d.next().is_some()));
}

#[test]
fn a_deployed_function_started_from_a_standby_sandbox_gets_its_own_policy() {
    if !runs_here("a_deployed_function_started_from_a_standby_sandbox_gets_its_own_policy") {
        return;
    }
    let (a, b) = (TestHost::new(), TestHost::new());
    let (on_a, on_b) = (TcpListen::start(&a, 0), TcpListen::start(&b, 0));
    let registry = Registry::start(RegistryConfig {
        auth: false,
        tls: false,
        token: false,
    });
    let digest = registry.push_layout("fn/netprobe", &netprobe_image(&HERE.layouts()));
    let image = format!("{}/fn/netprobe@{digest}", registry.host());
    let home = HERE.fresh_home("egress-serve");
    let mut serve = Serve::start(
        HERE.fnvm(),
        &home,
        HERE.agent(),
        &["--insecure-registry", &registry.host()],
    );
    let deploy = |name: &str, network: &[&str]| {
        let out = std::process::Command::new(HERE.fnvm)
            .args(["deploy", name, "--image", &image, "--timeout", "30"])
            .args(["--insecure-registry", &registry.host()])
            .args(network)
            .args(["--server", &serve.url("")])
            .env_remove("FNVM_API_TOKEN")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "deploy {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let invoke = |name: &str, op: Value| -> Value {
        let mut resp = http()
            .post(serve.url(&format!(
                "/v1/namespaces/default/functions/{name}/invocations"
            )))
            .send(op.to_string().as_bytes())
            .unwrap();
        serde_json::from_str(&resp.body_mut().read_to_string().unwrap()).unwrap()
    };
    let connect_op = |l: &TcpListen| json!({"op": "connect", "host": l.addr().to_string(), "port": l.port(), "timeout_s": 5});
    deploy("open", &[]);
    deploy("guarded", &["--egress-deny", &a.subnet()]);
    deploy("sealed", &["--network", "none"]);
    // Each cold start takes the service's standby sandbox, made before its function was known.
    assert_eq!(invoke("open", connect_op(&on_a))["ok"], true);
    assert_refused_fast(
        &invoke("guarded", connect_op(&on_a)),
        "a denied range, from a standby",
    );
    assert_eq!(invoke("guarded", connect_op(&on_b))["ok"], true);
    let sealed = invoke("sealed", json!({"op": "interfaces"}));
    assert_eq!(sealed["interfaces"], json!(["lo"]), "{sealed}");
    // The registry on the host's loopback is out of reach.
    let port: u16 = registry.host().rsplit(':').next().unwrap().parse().unwrap();
    assert_refused_fast(
        &invoke(
            "open",
            json!({"op": "connect", "host": "127.0.0.1", "port": port, "timeout_s": 5}),
        ),
        "the registry on the host's loopback",
    );
    // A bad range is a 400 that names it.
    let mut resp = http()
        .put(serve.url("/v1/namespaces/default/functions/bad"))
        .config()
        .http_status_as_error(false)
        .build()
        .send(
            json!({"image": image, "egress_deny": ["10.0.0.1/8"]})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body = resp.body_mut().read_to_string().unwrap();
    assert!(
        body.contains("network: --egress-deny 10.0.0.1/8: bits are set"),
        "{body}"
    );
    serve.stop();
    let pastas = processes_naming(&home.display().to_string(), "pasta");
    assert!(
        pastas.is_empty(),
        "pasta left running after the service stopped: {pastas:?}"
    );
}
