//! The control plane's threads under their seccomp filters: the instance
//! API thread, its actions thread, the supervisor's main thread and the
//! published-port proxy survive their steady state and die on anything
//! else. The filters themselves are in
//! [`kiln_vmm::seccomp`], with every other thread's.
use std::io::Write;
use std::os::unix::net::UnixListener;
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use kiln_control::api::{self, Response};
use kiln_control::instance::{Network, Registry, Spec};
use kiln_vmm::seccomp::ThreadKind;
use rustix::process::{Pid, PidfdFlags, Signal, pidfd_open, pidfd_send_signal};

#[path = "../../vmm/tests/support/filtered.rs"]
mod filtered;
use filtered::*;

/// An instance's launch spec, for a record to update.
fn spec() -> Spec {
    Spec {
        name: Some("web".into()),
        image: "hello:1.0.0".into(),
        instance_type: "k1.nano".into(),
        vcpus: 1,
        memory_mib: 128,
        cmdline: String::new(),
        network: Network::Bridge,
        private_ip: None,
        ports: Vec::new(),
    }
}

#[test]
fn api_and_actions_threads_survive_serving_requests_that_update_the_record() {
    let Some(output) =
        in_child_or_run("api_and_actions_threads_survive_serving_requests_that_update_the_record")
    else {
        let home = tempfile::tempdir().unwrap();
        let (mut instance, _vmm) = Registry::new(home.path())
            .create(spec(), None, None)
            .unwrap();
        let socket = home.path().join("api.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let mut vm = Command::new("sleep").arg("10").spawn().unwrap();
        let pidfd = pidfd_open(Pid::from_child(&vm), PidfdFlags::empty()).unwrap();
        // The actions thread updates the record and signals the VM process
        // for what the API thread parsed, as `instance::actions` does.
        let (orders, inbox) = mpsc::channel::<(bool, mpsc::SyncSender<Response>)>();
        let actions = spawn_filtered(ThreadKind::Actions, move || {
            for (pause, answer) in inbox {
                instance
                    .update(|r| {
                        r.paused = pause;
                        Ok(())
                    })
                    .unwrap();
                pidfd_send_signal(&pidfd, Signal::CONT).unwrap();
                answer.send(Response::json(200, &instance.record)).unwrap();
            }
        });
        let server = spawn_filtered(ThreadKind::Api, move || {
            for stream in listener.incoming().take(2) {
                api::serve_one(stream.unwrap(), |request| {
                    let (answer, answered) = mpsc::sync_channel(1);
                    orders.send((request.method == "PUT", answer)).unwrap();
                    answered.recv().unwrap()
                })
                .unwrap();
            }
        });
        let action = serde_json::json!({ "action": "pause" });
        let paused = api::call(&socket, "PUT", "/actions", Some(&action)).unwrap();
        assert_eq!(paused.body.unwrap()["paused"], true);
        // A garbage request gets its JSON error from the filtered thread too.
        let mut raw = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        raw.write_all(b"\x00 not http\r\n\r\n").unwrap();
        let mut answer = String::new();
        std::io::Read::read_to_string(&mut raw, &mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        server.join().unwrap();
        actions.join().unwrap();
        vm.kill().unwrap();
        vm.wait().unwrap();
        say_survived();
        return;
    };
    assert_survived(&output);
}

/// The proxy's stand-in guest: an echo service on a second loopback
/// address where it can be bound (all of 127/8 is the loopback device),
/// on an unfiltered thread; its address and port.
fn echo_guest() -> (std::net::Ipv4Addr, u16) {
    use std::net::{Ipv4Addr, Shutdown, TcpListener};
    let listener = TcpListener::bind((Ipv4Addr::new(127, 0, 0, 2), 0))
        .or_else(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .unwrap();
    let std::net::SocketAddr::V4(addr) = listener.local_addr().unwrap() else {
        unreachable!("bound on IPv4")
    };
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let stream = stream.unwrap();
            std::thread::spawn(move || {
                if std::io::copy(&mut &stream, &mut &stream).is_ok() {
                    let _ = stream.shutdown(Shutdown::Write);
                }
            });
        }
    });
    (*addr.ip(), addr.port())
}

#[test]
fn proxy_thread_survives_proxying_connections_and_its_end() {
    use kiln_control::network::proxy::{PortMap, Proxy};
    use std::io::Read;
    use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};

    let Some(output) = in_child_or_run("proxy_thread_survives_proxying_connections_and_its_end")
    else {
        // The proxy installs its filter on a thread of its own.
        no_core_dumps();
        let (guest, echo_port) = echo_guest();
        let refused_port = TcpListener::bind((guest, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let proxy = Proxy::bind(&[
            PortMap {
                host: 0,
                guest: echo_port,
            },
            PortMap {
                host: 0,
                guest: refused_port,
            },
        ])
        .unwrap();
        let [echo, refused] = [0, 1].map(|index| proxy.ports()[index].host);
        let handle = proxy.spawn(guest, true).unwrap();
        let connect = |port| {
            let stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            stream
        };
        // A refused guest port: the proxy warns and closes the client.
        let mut byte = [0u8; 1];
        assert!(matches!(connect(refused).read(&mut byte), Ok(0) | Err(_)));
        // Many connections at once, each echoed whole after a half-close;
        // buffers fill and drain, sockets come and go.
        let streams: Vec<TcpStream> = (0..64).map(|_| connect(echo)).collect();
        let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        let senders: Vec<_> = streams
            .iter()
            .map(|stream| {
                let mut writer = stream.try_clone().unwrap();
                let data = data.clone();
                std::thread::spawn(move || {
                    writer.write_all(&data).unwrap();
                    writer.shutdown(Shutdown::Write).unwrap();
                })
            })
            .collect();
        for mut stream in &streams {
            let mut received = Vec::new();
            stream.read_to_end(&mut received).unwrap();
            assert!(received == data);
        }
        senders.into_iter().for_each(|s| s.join().unwrap());
        // An open connection when the proxy stops: the thread closes it,
        // frees what it holds and ends, all under its filter.
        let open = connect(echo);
        drop(streams);
        drop(handle);
        assert!(matches!((&open).read(&mut byte), Ok(0) | Err(_)));
        say_survived();
        return;
    };
    assert_survived(&output);
}

#[test]
fn proxy_thread_dies_on_a_socket_other_than_ipv4() {
    let Some(output) = in_child_or_run("proxy_thread_dies_on_a_socket_other_than_ipv4") else {
        on_filtered_thread(ThreadKind::Proxy, || {
            // SAFETY: socket(2) has no memory-safety preconditions.
            unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
            say_survived();
        });
        return;
    };
    assert_reported(&output, ThreadKind::Proxy, libc::SYS_socket);
}

#[test]
fn actions_thread_signals_only_through_a_pidfd() {
    let Some(output) = in_child_or_run("actions_thread_signals_only_through_a_pidfd") else {
        let pid = std::process::id() as libc::pid_t;
        on_filtered_thread(ThreadKind::Actions, move || {
            // SAFETY: kill only reads its integer arguments; had it been
            // let through, SIGCONT to oneself changes nothing.
            unsafe { libc::kill(pid, libc::SIGCONT) };
            say_survived();
        });
        return;
    };
    assert_reported(&output, ThreadKind::Actions, libc::SYS_kill);
}

#[test]
fn api_thread_signals_no_process() {
    let Some(output) = in_child_or_run("api_thread_signals_no_process") else {
        let mut vm = Command::new("sleep").arg("10").spawn().unwrap();
        let pidfd = pidfd_open(Pid::from_child(&vm), PidfdFlags::empty()).unwrap();
        on_filtered_thread(ThreadKind::Api, move || {
            let _ = pidfd_send_signal(&pidfd, Signal::CONT);
            say_survived();
        });
        vm.kill().unwrap();
        vm.wait().unwrap();
        return;
    };
    assert_reported(&output, ThreadKind::Api, libc::SYS_pidfd_send_signal);
}

#[test]
fn api_thread_opens_no_file() {
    let Some(output) = in_child_or_run("api_thread_opens_no_file") else {
        on_filtered_thread(ThreadKind::Api, || {
            let _ = std::fs::File::open("/");
            say_survived();
        });
        return;
    };
    assert_reported(&output, ThreadKind::Api, libc::SYS_openat);
}

/// What the supervisor's main thread does between its VM processes, under
/// its filter: waits for one (started before, as the launcher thread
/// starts them), copies its console, rotates the log with stderr pointed
/// at the fresh file, writes the record, and removes the API socket; then
/// ends the process, as it does.
#[test]
fn supervisor_thread_survives_waiting_logging_and_recording() {
    let test = "supervisor_thread_survives_waiting_logging_and_recording";
    let Some(output) = in_child_or_run(test) else {
        use std::os::fd::AsRawFd;
        let home = tempfile::tempdir().unwrap();
        let (mut instance, _vmm) = Registry::new(home.path())
            .create(spec(), None, None)
            .unwrap();
        let socket = home.path().join("api.sock");
        let _listener = UnixListener::bind(&socket).unwrap();
        let mut vm = Command::new("echo")
            .arg("console")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut console = vm.stdout.take().unwrap();
        let log = home.path().join("console.log");
        let mut file = std::fs::File::create(&log).unwrap();
        let _ = spawn_filtered(ThreadKind::Supervisor, move || {
            // Read and written (io::copy would splice: `copy_into` does not).
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut console, &mut bytes).unwrap();
            file.write_all(&bytes).unwrap();
            assert!(vm.wait().unwrap().success());
            std::fs::rename(&log, home.path().join("console.log.1")).unwrap();
            let fresh = std::fs::File::options()
                .create(true)
                .append(true)
                .open(&log)
                .unwrap();
            // SAFETY: dup2 takes two descriptor numbers; both are open.
            assert!(unsafe { libc::dup2(fresh.as_raw_fd(), libc::STDERR_FILENO) } >= 0);
            instance
                .update(|r| {
                    r.paused = false;
                    Ok(())
                })
                .unwrap();
            std::fs::remove_file(&socket).unwrap();
            say_survived();
            std::process::exit(0);
        })
        .join();
        unreachable!("the supervisor's thread ends the process");
    };
    assert_survived(&output);
}

#[test]
fn supervisor_thread_starts_no_process() {
    let Some(output) = in_child_or_run("supervisor_thread_starts_no_process") else {
        let _ = spawn_filtered(ThreadKind::Supervisor, || {
            let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
            // SAFETY: execve reads a NUL-terminated path and a
            // null-terminated argument list, both alive across the call;
            // the environment may be null. Had it been let through, the
            // process would become /bin/true, which says nothing.
            unsafe { libc::execve(argv[0], argv.as_ptr(), std::ptr::null()) };
            say_survived();
            std::process::exit(0);
        })
        .join();
        return;
    };
    assert_reported(&output, ThreadKind::Supervisor, libc::SYS_execve);
}
