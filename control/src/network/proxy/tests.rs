//! The proxy over real sockets: clients on 127.0.0.1, and services on a
//! second loopback address standing in for the guest. The proxy threads
//! run under their seccomp filter: a call it lacks kills the test binary.
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use super::*;

const TIMEOUT: Duration = Duration::from_secs(20);

/// Where guest services listen: 127.0.0.2 if it can be bound here (Linux
/// routes all of 127/8 to the loopback device), else 127.0.0.1.
fn guest_ip() -> Ipv4Addr {
    let second = Ipv4Addr::new(127, 0, 0, 2);
    if TcpListener::bind((second, 0)).is_ok() {
        second
    } else {
        Ipv4Addr::LOCALHOST
    }
}

/// A guest service running `serve` on each connection, on a thread of
/// its own; returns its port on [`guest_ip`].
fn guest_service(serve: fn(TcpStream)) -> u16 {
    let listener = TcpListener::bind((guest_ip(), 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    serve_on(listener, serve);
    port
}

/// Runs `serve` on each connection to `listener`, on a thread of its own.
fn serve_on(listener: TcpListener, serve: fn(TcpStream)) {
    thread::spawn(move || {
        for stream in listener.incoming() {
            let stream = stream.unwrap();
            thread::spawn(move || serve(stream));
        }
    });
}

/// Sends back what it reads, then shuts its side at the end of file.
fn echo(stream: TcpStream) {
    let copied = std::io::copy(&mut &stream, &mut &stream);
    if copied.is_ok() {
        let _ = stream.shutdown(Shutdown::Write);
    }
}

/// A guest port nothing listens on.
fn closed_guest_port() -> u16 {
    let listener = TcpListener::bind((guest_ip(), 0)).unwrap();
    listener.local_addr().unwrap().port()
}

/// A proxy publishing `guest_port` on a host port the kernel picks.
fn publish(guest_port: u16) -> (ProxyHandle, u16) {
    let proxy = Proxy::bind(&[PortMap {
        host: 0,
        guest: guest_port,
    }])
    .unwrap();
    let host = proxy.ports()[0].host;
    (proxy.spawn(guest_ip(), true).unwrap(), host)
}

/// A client of the proxy on `host_port`, with timeouts that fail the test
/// rather than hang it.
fn client(host_port: u16) -> TcpStream {
    let stream = TcpStream::connect((Ipv4Addr::LOCALHOST, host_port)).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(TIMEOUT)).unwrap();
    stream
}

/// `len` bytes no two connections share (xorshift from `seed`), so a
/// dropped, doubled or misordered chunk shows.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Sends `data` and shuts writing on one thread, reads to the end on this
/// one: what came back.
fn round_trip(stream: TcpStream, data: Vec<u8>) -> Vec<u8> {
    let mut writer = stream.try_clone().unwrap();
    let sender = thread::spawn(move || {
        writer.write_all(&data).unwrap();
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut received = Vec::new();
    (&stream).read_to_end(&mut received).unwrap();
    sender.join().unwrap();
    received
}

/// Whether the proxy closed `stream`: an end of file or a reset, not a
/// timeout and not data.
fn closed_by_proxy(mut stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => true,
        Err(err) => err.kind() == ErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}

#[test]
fn a_port_map_is_host_colon_guest_or_one_port_for_both() {
    let parse = |text: &str| text.parse::<PortMap>().unwrap();
    assert_eq!(
        parse("8080:80"),
        PortMap {
            host: 8080,
            guest: 80
        }
    );
    assert_eq!(
        parse("443"),
        PortMap {
            host: 443,
            guest: 443
        }
    );
    assert_eq!(
        parse("65535:1"),
        PortMap {
            host: 65535,
            guest: 1
        }
    );
    assert_eq!(parse("8080:80").to_string(), "8080:80");
    assert_eq!(parse("443").to_string(), "443:443");
}

#[test]
fn a_bad_port_map_names_the_value_and_the_form() {
    for bad in [
        "", "80:", ":80", "80:x", "x", "0", "0:80", "80:0", "65536", "80:65536", "1:2:3", "+80",
        "-1", " 80", "80 ", "80/tcp",
    ] {
        let err = bad.parse::<PortMap>().unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("-p {bad}: expected HOST_PORT:GUEST_PORT, ports 1-65535"),
        );
    }
}

#[test]
fn the_error_can_travel_as_a_boxed_error() {
    // What clap's value parsers and anyhow ask of an error type.
    fn boxed<E: std::error::Error + Send + Sync + 'static>(err: E) -> Box<dyn std::error::Error> {
        Box::new(err)
    }
    let err = boxed("80:x".parse::<PortMap>().unwrap_err());
    assert_eq!(
        err.to_string(),
        "-p 80:x: expected HOST_PORT:GUEST_PORT, ports 1-65535"
    );
}

#[test]
fn a_port_map_serializes_as_its_two_ports() {
    let map = PortMap {
        host: 8080,
        guest: 80,
    };
    let json = serde_json::to_string(&map).unwrap();
    assert_eq!(json, r#"{"host":8080,"guest":80}"#);
    assert_eq!(serde_json::from_str::<PortMap>(&json).unwrap(), map);
}

#[test]
fn bind_refuses_a_port_in_use() {
    let taken = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = taken.local_addr().unwrap().port();
    let err = Proxy::bind(&[PortMap {
        host: port,
        guest: 80,
    }])
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("port {port} on 127.0.0.1 is already in use (published as {port}:80)")
    );
}

#[test]
fn bind_refuses_a_host_port_listed_twice() {
    let maps = ["18080:80", "18081:81", "18080:82"].map(|text| text.parse().unwrap());
    let err = Proxy::bind(&maps).unwrap_err();
    assert_eq!(
        err.to_string(),
        "host port 18080 is published twice (18080:80 and 18080:82)"
    );
}

#[test]
fn bind_refuses_a_privileged_port_without_the_capability() {
    // ip(7): ports below this one need CAP_NET_BIND_SERVICE; without the
    // file (kernels before 4.11) it is 1024.
    let unprivileged_start: u16 =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
            .map_or(1024, |text| text.trim().parse().unwrap());
    // Capabilities are per thread: this one drops its own.
    let bound = thread::spawn(|| {
        drop_net_bind_service();
        Proxy::bind(&["1:80".parse().unwrap()])
    })
    .join()
    .unwrap();
    if unprivileged_start <= 1 {
        // No port is privileged on this host: port 1 is anyone's.
        let proxy = bound.unwrap();
        assert_eq!(proxy.ports(), ["1:80".parse().unwrap()]);
    } else {
        assert_eq!(
            bound.unwrap_err().to_string(),
            "port 1 on 127.0.0.1 is privileged and this process may not bind it \
             (published as 1:80): pick a host port from 1024 up"
        );
    }
}

/// Removes CAP_NET_BIND_SERVICE from the calling thread's effective set.
fn drop_net_bind_service() {
    caps::drop(
        None,
        caps::CapSet::Effective,
        caps::Capability::CAP_NET_BIND_SERVICE,
    )
    .expect("capset");
}

#[test]
fn a_rate_limit_lets_one_line_a_second_through_and_counts_the_rest() {
    let start = Instant::now();
    let at = |ms| start + Duration::from_millis(ms);
    let mut limit = RateLimit::new(Duration::from_secs(1));
    assert_eq!(limit.admit(at(0)), Some(0));
    assert_eq!(limit.admit(at(1)), None);
    assert_eq!(limit.admit(at(999)), None);
    // A second after the last line let through, with the two held back.
    assert_eq!(limit.admit(at(1000)), Some(2));
    assert_eq!(limit.admit(at(1999)), None);
    // After a quiet spell, the one held back is still counted.
    assert_eq!(limit.admit(at(60_000)), Some(1));
    assert_eq!(limit.admit(at(60_001)), None);
}

#[test]
fn eight_mib_go_through_both_ways_byte_for_byte() {
    let (_proxy, host) = publish(guest_service(echo));
    let sent = pattern(8 << 20, 1);
    let received = round_trip(client(host), sent.clone());
    assert_eq!(received.len(), sent.len());
    assert!(received == sent, "the bytes came back changed");
}

/// Reads to the end of file, then answers how many bytes came: it only
/// answers if the proxy passed the client's half-close on.
fn count_then_answer(mut stream: TcpStream) {
    let mut received = Vec::new();
    stream.read_to_end(&mut received).unwrap();
    write!(stream, "{} bytes", received.len()).unwrap();
}

#[test]
fn a_client_that_shuts_writing_still_gets_the_answer() {
    let (_proxy, host) = publish(guest_service(count_then_answer));
    let answer = round_trip(client(host), pattern(300_000, 2));
    assert_eq!(String::from_utf8(answer).unwrap(), "300000 bytes");
}

#[test]
fn many_connections_at_once_each_get_their_own_bytes() {
    const CONNECTIONS: usize = 300;
    let (_proxy, host) = publish(guest_service(echo));
    // All open before any sends; small enough for the kernel's buffers,
    // so one thread can send on all, then read from all.
    let streams: Vec<TcpStream> = (0..CONNECTIONS).map(|_| client(host)).collect();
    for (index, mut stream) in streams.iter().enumerate() {
        stream.write_all(&pattern(4096, index as u64)).unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
    }
    for (index, mut stream) in streams.iter().enumerate() {
        let mut received = Vec::new();
        stream.read_to_end(&mut received).unwrap();
        assert!(
            received == pattern(4096, index as u64),
            "connection {index}"
        );
    }
}

#[test]
fn a_refused_guest_port_closes_the_client_and_no_other() {
    let proxy = Proxy::bind(&[
        PortMap {
            host: 0,
            guest: closed_guest_port(),
        },
        PortMap {
            host: 0,
            guest: guest_service(echo),
        },
    ])
    .unwrap();
    let [refused, served] = [0, 1].map(|index| proxy.ports()[index].host);
    let _proxy = proxy.spawn(guest_ip(), true).unwrap();
    let open = client(served);
    let started = Instant::now();
    assert!(closed_by_proxy(&client(refused)));
    assert!(started.elapsed() < TIMEOUT);
    assert_eq!(round_trip(open, b"still here".to_vec()), b"still here");
}

#[test]
fn a_client_reset_mid_transfer_leaves_the_others_alone() {
    let (_proxy, host) = publish(guest_service(echo));
    let other = client(host);
    let mut reset = client(host);
    reset.write_all(&pattern(1 << 20, 3)).unwrap();
    // A zero linger makes close send a reset instead of a FIN.
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt reads a linger struct of the size given.
    let ret = unsafe {
        libc::setsockopt(
            reset.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(ret, 0);
    drop(reset);
    let data = pattern(1 << 20, 4);
    assert!(round_trip(other, data.clone()) == data);
}

#[test]
fn connections_beyond_the_cap_are_closed_until_one_ends() {
    let mut proxy = Proxy::bind(&[PortMap {
        host: 0,
        guest: guest_service(echo),
    }])
    .unwrap();
    proxy.max_connections = 2;
    let host = proxy.ports()[0].host;
    let _proxy = proxy.spawn(guest_ip(), true).unwrap();
    let first = client(host);
    let second = client(host);
    for mut stream in [&first, &second] {
        stream.write_all(b"ping").unwrap();
        let mut pong = [0u8; 4];
        stream.read_exact(&mut pong).unwrap();
        assert_eq!(&pong, b"ping");
    }
    assert!(closed_by_proxy(&client(host)));
    // The first ends: the proxy has let it go by the time its client reads
    // the end of file, so a new connection has its slot.
    assert_eq!(round_trip(first, Vec::new()), b"");
    assert_eq!(round_trip(client(host), b"third".to_vec()), b"third");
    assert_eq!(round_trip(second, b"second".to_vec()), b"second");
}

#[test]
fn dropping_the_handle_stops_the_thread_and_closes_everything() {
    let (proxy, host) = publish(guest_service(echo));
    let mut open = client(host);
    open.write_all(b"ping").unwrap();
    let mut pong = [0u8; 4];
    open.read_exact(&mut pong).unwrap();
    // Returns once the thread has been joined.
    drop(proxy);
    assert!(closed_by_proxy(&open));
    let err = TcpStream::connect((Ipv4Addr::LOCALHOST, host)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused);
}

/// Whether this is the child process in which test `name` runs alone; in
/// the parent, runs it there and checks that it passed. For tests that
/// measure the process's CPU time or change its descriptor limit.
fn in_own_process(name: &str) -> bool {
    const CHILD: &str = "KILN_PROXY_TEST_CHILD";
    if std::env::var(CHILD).is_ok_and(|child| child == name) {
        return true;
    }
    let test = format!("network::proxy::tests::{name}");
    let output = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", &test, "--nocapture", "--test-threads=1"])
        .env(CHILD, name)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "{test} in its own process: {:?}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    false
}

/// CPU time the process has used, all threads.
fn process_cpu_time() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage fills the struct it is given.
    let ret = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    assert_eq!(ret, 0);
    // SAFETY: getrusage succeeded, so the struct is filled.
    let usage = unsafe { usage.assume_init() };
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// Checks that the process uses next to no CPU over half a second in
/// which this thread sleeps: nothing spins.
fn assert_the_process_idles() {
    let before = process_cpu_time();
    thread::sleep(Duration::from_millis(500));
    let used = process_cpu_time() - before;
    assert!(
        used < Duration::from_millis(100),
        "{used:?} of CPU in 500 ms"
    );
}

/// A guest that never reads nor writes.
fn hold(stream: TcpStream) {
    thread::sleep(Duration::from_secs(600));
    drop(stream);
}

/// Sets a socket's SO_SNDBUF or SO_RCVBUF (the kernel doubles it).
fn set_buffer_size(stream: &TcpStream, option: libc::c_int, bytes: libc::c_int) {
    // SAFETY: setsockopt reads an int of the size given.
    let ret = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&raw const bytes).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(ret, 0, "setsockopt: {}", io::Error::last_os_error());
}

/// Reads to the end of file, then holds on without answering.
fn drain_then_hold(mut stream: TcpStream) {
    std::io::copy(&mut stream, &mut std::io::sink()).unwrap();
    hold(stream);
}

#[test]
fn the_loop_sleeps_while_no_byte_can_move() {
    if !in_own_process("the_loop_sleeps_while_no_byte_can_move") {
        return;
    }
    // Every buffer full: a guest that does not read, a client that sends
    // until its own socket takes no more.
    let (_full, host) = publish(guest_service(hold));
    let full = client(host);
    full.set_nonblocking(true).unwrap();
    let chunk = pattern(BUFFER_SIZE, 6);
    let deadline = Instant::now() + TIMEOUT;
    while (&full).write(&chunk).is_ok() {
        assert!(Instant::now() < deadline, "the writes never blocked");
    }
    // The client has shut writing, the guest read to the end and says
    // nothing.
    let (_quiet, host) = publish(guest_service(drain_then_hold));
    let half_closed = client(host);
    half_closed.shutdown(Shutdown::Write).unwrap();
    // Both have shut writing, then the guest answers: its socket hangs up
    // with bytes unread, and, out of epoll from then on, is read while
    // its bytes move on to the client.
    let (_answered, host) = publish(guest_service(answer_after_the_end_then_hold));
    let answered = client(host);
    set_buffer_size(&answered, libc::SO_RCVBUF, 4096);
    answered.shutdown(Shutdown::Write).unwrap();
    thread::sleep(Duration::from_millis(300));
    assert_the_process_idles();
    assert_gets_the_held_bytes(&answered);
}

/// Reads `stream` to its end (its receive buffer made large again): the
/// bytes [`answer_after_the_end_then_hold`] sent, whole.
fn assert_gets_the_held_bytes(mut stream: &TcpStream) {
    set_buffer_size(stream, libc::SO_RCVBUF, 1 << 20);
    let mut received = Vec::new();
    stream.read_to_end(&mut received).unwrap();
    assert!(
        received == pattern(HELD_BACK_BYTES, 5),
        "the held bytes changed"
    );
}

/// Takes every free descriptor below the process's limit but `spare`;
/// closing the returned ones gives them back.
fn exhaust_descriptors(spare: usize) -> Vec<std::os::fd::OwnedFd> {
    let mut taken = Vec::new();
    loop {
        match std::fs::File::open("/dev/null") {
            Ok(file) => taken.push(std::os::fd::OwnedFd::from(file)),
            Err(err) if err.raw_os_error() == Some(libc::EMFILE) => break,
            Err(err) => panic!("{err}"),
        }
    }
    taken.truncate(taken.len() - spare);
    taken
}

#[test]
fn accepting_pauses_while_descriptors_run_out_then_resumes() {
    if !in_own_process("accepting_pauses_while_descriptors_run_out_then_resumes") {
        return;
    }
    // The guest's service starts once descriptors are back: a thread
    // waiting in accept would fail at once when they run out.
    let guest = TcpListener::bind((guest_ip(), 0)).unwrap();
    let (_proxy, host) = publish(guest.local_addr().unwrap().port());
    let mut limit = std::mem::MaybeUninit::<libc::rlimit>::uninit();
    // SAFETY: getrlimit fills the struct it is given.
    let ret = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, limit.as_mut_ptr()) };
    assert_eq!(ret, 0);
    // SAFETY: getrlimit succeeded, so the struct is filled.
    let limit = unsafe { limit.assume_init() };
    let set_limit = |rlim_cur| {
        let new = libc::rlimit { rlim_cur, ..limit };
        // SAFETY: setrlimit only reads the struct passed by reference.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) }, 0);
    };
    set_limit(256);
    // One descriptor left, for the client: the proxy's accept fails.
    let taken = exhaust_descriptors(1);
    let waiting = client(host);
    assert_the_process_idles();
    // Descriptors back all at once (closing `taken` one by one would let
    // the proxy accept, then fail its connect to the guest).
    set_limit(limit.rlim_cur);
    serve_on(guest, echo);
    assert_eq!(round_trip(waiting, b"accepted".to_vec()), b"accepted");
    drop(taken);
}

/// More than the client's side holds (the proxy's buffer, its small
/// send buffer to the client, the client's small receive buffer), less
/// than the guest's side adds to that: the guest's write completes, its
/// end of file arrives, and bytes still wait on the proxy's socket to it.
const HELD_BACK_BYTES: usize = 128 * 1024;

/// Reads to the end of file, then sends `HELD_BACK_BYTES` (all into its
/// large send buffer), shuts writing and holds on.
fn answer_after_the_end_then_hold(mut stream: TcpStream) {
    std::io::copy(&mut stream, &mut std::io::sink()).unwrap();
    set_buffer_size(&stream, libc::SO_SNDBUF, 1 << 20);
    stream.write_all(&pattern(HELD_BACK_BYTES, 5)).unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    hold(stream);
}

/// The proxy's own socket connected to `peer`, found among this
/// process's descriptors once it is there. Not to be dropped: the proxy
/// owns it.
fn proxy_socket_to(peer: std::net::SocketAddr) -> std::mem::ManuallyDrop<TcpStream> {
    let deadline = Instant::now() + TIMEOUT;
    while Instant::now() < deadline {
        for entry in std::fs::read_dir("/proc/self/fd").unwrap() {
            let Ok(fd) = entry.unwrap().file_name().to_string_lossy().parse() else {
                continue;
            };
            // SAFETY: a descriptor listed as open in this process, whose
            // sockets stay open while the test runs; ManuallyDrop never
            // closes it.
            let socket = std::mem::ManuallyDrop::new(unsafe { TcpStream::from_raw_fd(fd) });
            if socket.peer_addr().is_ok_and(|addr| addr == peer) {
                return socket;
            }
        }
        thread::sleep(Duration::from_millis(1));
    }
    panic!("no socket of the proxy is connected to {peer}");
}

#[test]
fn a_socket_that_hangs_up_with_bytes_unread_is_not_spun_on() {
    if !in_own_process("a_socket_that_hangs_up_with_bytes_unread_is_not_spun_on") {
        return;
    }
    let guest_port = guest_service(answer_after_the_end_then_hold);
    let (_proxy, host) = publish(guest_port);
    let hung_up = client(host);
    // Little room toward the client: its receive buffer and the proxy's
    // send buffer to it made small (the kernel would grow them). Much
    // room from the guest: the proxy's receive buffer from it made large,
    // so that the guest's end of file arrives behind bytes unread.
    set_buffer_size(&hung_up, libc::SO_RCVBUF, 4096);
    let to_client = proxy_socket_to(hung_up.local_addr().unwrap());
    set_buffer_size(&to_client, libc::SO_SNDBUF, 4096);
    let to_guest = proxy_socket_to((guest_ip(), guest_port).into());
    set_buffer_size(&to_guest, libc::SO_RCVBUF, 1 << 20);
    // The guest answers once the client's end of file reaches it.
    hung_up.shutdown(Shutdown::Write).unwrap();
    thread::sleep(Duration::from_millis(300));
    assert_the_process_idles();
    assert_gets_the_held_bytes(&hung_up);
}
