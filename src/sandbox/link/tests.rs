//! The link against a scripted agent: log stamps of an agent whose clock is off.

use std::io::BufReader;
use std::os::unix::net::UnixListener;

use fnvm_agent::protocol::{AgentMessage, CONTROL_PORT};

use super::*;

/// The other end of a control stream, speaking the protocol by hand with a clock `ahead_us`
/// ahead of the host's (a VM whose clock drifted). It prints "printed now" after answering
/// `log_after_pongs` pings (0: right after Ready, before any ping).
fn scripted_agent(listener: UnixListener, ahead_us: u64, log_after_pongs: usize) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut writer = stream;
        let guest_now = || host_now_us() + ahead_us;
        let mut answered = 0;
        while let Ok(Some(message)) = protocol::read_message::<_, HostMessage>(&mut reader) {
            let reply = match message {
                HostMessage::Hello { version } => AgentMessage::Hello {
                    version,
                    agent: "scripted".into(),
                    uptime_ms: 1,
                },
                HostMessage::Start(_) => AgentMessage::Ready {
                    after_ms: 1,
                    after_us: Some(1_200),
                },
                HostMessage::Ping { seq } => AgentMessage::Pong {
                    seq,
                    unix_time_us: guest_now(),
                },
                other => panic!("unexpected {other:?}"),
            };
            // The host closes the stream once it has the line: a ping answered after
            // that has nobody to go to, which ends the script.
            if protocol::write_message(&mut writer, &reply).is_err() {
                break;
            }
            let now_is_the_time = match reply {
                AgentMessage::Ready { .. } => log_after_pongs == 0,
                AgentMessage::Pong { .. } => {
                    answered += 1;
                    answered == log_after_pongs
                }
                _ => false,
            };
            if now_is_the_time {
                protocol::write_message(
                    &mut writer,
                    &AgentMessage::Log {
                        stream: protocol::LogStream::Stdout,
                        unix_time_us: guest_now(),
                        line: "printed now".into(),
                    },
                )
                .expect("the host reads until it has the line");
            }
        }
    })
}

/// How much earlier than its arrival a line of an agent 5 s ahead is stamped on the host's
/// time line, printed after `log_after_pongs` clock answers.
fn early_by_of_a_line_from_an_agent_5_s_ahead(log_after_pongs: usize) -> i64 {
    let dir = tempfile::tempdir().unwrap();
    let listener = UnixListener::bind(crate::sandbox::transport::unix_port_path(
        dir.path(),
        CONTROL_PORT,
    ))
    .unwrap();
    let agent = scripted_agent(listener, 5_000_000, log_after_pongs);
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let on_log: Arc<dyn Fn(LogLine) + Send + Sync> = Arc::new(move |line: LogLine| {
        let _ = tx.lock().unwrap().send((line, host_now_us()));
    });
    let link = start(
        &HostTransport::Unix {
            dir: dir.path().to_path_buf(),
        },
        // A VM's agent, reached through a Unix socket here.
        ClockSource::Own,
        &StartSpec {
            argv: vec!["/f".into()],
            env: vec![],
            working_dir: "/".into(),
            user: None,
            ready_timeout_ms: 1000,
            resolv_conf: None,
        },
        on_log,
        ExitState::new(|| None),
        &|| None,
        Duration::from_secs(5),
        &|| Ok(()),
    )
    .expect("the scripted agent starts");
    // The agent's start → listening time keeps its microseconds (it said 1,200 µs).
    assert_eq!(
        link.agent_times().listening_after,
        Some(Duration::from_micros(1_200))
    );
    let (line, received_us) = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the scripted agent's line");
    assert_eq!(line.line, "printed now");
    link.close();
    agent.join().unwrap();
    received_us as i64 - line.unix_time_us as i64
}

#[test]
fn log_stamps_of_an_agent_whose_clock_is_off_arrive_on_the_hosts_time_line() {
    // Stamped 5 s ahead by the guest; on the host's line it was printed just before it
    // arrived. The estimate is good to half a round trip either way; the test allows a
    // generous margin for a loaded machine, far inside the 5 s it corrects.
    let early_by = early_by_of_a_line_from_an_agent_5_s_ahead(2);
    assert!((-100_000..500_000).contains(&early_by), "{early_by} µs");
}

#[test]
fn a_line_printed_before_the_first_clock_answer_is_not_placed_in_the_future() {
    // Right after Ready, before the host measured the clock: the raw stamp is 5 s ahead,
    // which would give the line to a request not yet made. It is placed at its arrival.
    let early_by = early_by_of_a_line_from_an_agent_5_s_ahead(0);
    assert!((0..500_000).contains(&early_by), "{early_by} µs");
}
