//! The ssh streams of a remote run: starting each one (the handshake up to the
//! server's reply), the go or the refusal, and ending them.

use super::settings::Settings;
use crate::digestfile::trust;
use crate::engine::Layout;
use crate::engine::messages::ToSource;
use crate::error::{Error, Kind, Result};
use crate::ssh::connect::{Connection, SshOptions, last_line};
use crate::wire::frame::{Frame, Go, Hello, Reply, read_frame, write_frame};
use std::time::{Duration, Instant};

/// One started stream: the connection and the server's reply.
pub(super) struct Stream {
    pub conn: Connection,
    pub reply: Reply,
}

pub(super) fn handshake(opts: &SshOptions, host: &str, hello: &Hello) -> Result<Stream> {
    let mut conn = opts.connect(host)?;
    let mut buf = Vec::new();
    let sent = write_frame(&mut conn.writer, &Frame::Hello(hello.clone()));
    let answer = read_frame(&mut conn.reader, &mut buf);
    match (sent, answer) {
        (_, Ok((Frame::Reply(reply), _))) => Ok(Stream { conn, reply }),
        (_, Ok((Frame::Source(ToSource::Failed { kind, message }), _))) => {
            let _ = conn.child.wait();
            Err(Error::new(kind, format!("on {host}: {message}")))
        }
        (_, Ok((other, _))) => {
            drop(conn.writer);
            reap(&mut conn.child);
            Err(Error::new(
                Kind::Protocol,
                format!("{host} answered the hello with {other:?}"),
            ))
        }
        (_, Err(e)) => {
            let _ = conn.child.wait();
            let detail = conn
                .stderr
                .lock()
                .map(|s| crate::error::peer_text(&s))
                .unwrap_or_default();
            Err(Error::new(
                Kind::Remote,
                format!(
                    "{host}: the remote blocksync stopped during the handshake ({e}){}",
                    if detail.is_empty() {
                        String::new()
                    } else {
                        format!(": {detail}")
                    }
                ),
            ))
        }
    }
}

pub(super) fn send_go(stream: &mut Stream, go: Go) -> Result<()> {
    write_frame(&mut stream.conn.writer, &Frame::Go(go)).map_err(|e| {
        Error::new(
            Kind::Remote,
            format!(
                "{}: sending go: {}",
                stream.conn.host,
                crate::error::os_text(&e)
            ),
        )
    })?;
    Ok(())
}

pub(super) fn refuse_all(streams: &mut [Stream]) {
    for s in streams {
        let _ = send_go(
            s,
            Go {
                proceed: false,
                size: 0,
                start: 0,
                end: 0,
                sync_id: [0; 16],
                no_read: false,
            },
        );
        let _ = s.conn.child.wait();
    }
}

/// Starts every stream; the first may deploy the binary, the others then find it cached.
pub(super) fn connect_all(
    settings: &Settings,
    opts: &SshOptions,
    host: &str,
    hello: &Hello,
) -> Result<Vec<Stream>> {
    // Each stream's hello says which part of the run it is (what it locks).
    let part = |i: u32| {
        let mut h = hello.clone();
        h.run.stream = i;
        h
    };
    let mut streams = vec![handshake(opts, host, &part(0))?];
    if settings.workers > 1 {
        let rest: Vec<Result<Stream>> = std::thread::scope(|s| {
            let handles: Vec<_> = (1..settings.workers)
                .map(|i| {
                    let h = part(i);
                    s.spawn(move || handshake(opts, host, &h))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("handshake thread"))
                .collect()
        });
        for r in rest {
            match r {
                Ok(s) => streams.push(s),
                Err(e) => {
                    refuse_all(&mut streams);
                    return Err(e);
                }
            }
        }
    }
    Ok(streams)
}

/// Tells each stream its range and goes; on a failure, ends every stream cleanly.
pub(super) fn send_all_go(
    streams: &mut [Stream],
    whole: Layout,
    cached: Option<&trust::Use>,
) -> Result<()> {
    let n = streams.len() as u64;
    for i in 0..streams.len() {
        let part = whole.part(i as u64, n);
        let go = Go {
            proceed: true,
            size: whole.size,
            start: part.start,
            end: part.end,
            sync_id: cached.map_or([0; 16], |u| u.new_id),
            no_read: cached.is_some_and(|u| u.skip_reading),
        };
        if let Err(e) = send_go(&mut streams[i], go) {
            // Refuse the streams not started; end the started ones (they stop at the
            // closed stream before any block arrives) and reap every ssh.
            refuse_all(&mut streams[i + 1..]);
            for s in &mut streams[..=i] {
                let _ = s.conn.child.kill();
                let _ = s.conn.child.wait();
            }
            return Err(e);
        }
    }
    Ok(())
}

/// Waits for the ssh process to end after the protocol finished; kills it if it lingers,
/// so a stuck peer never hangs the run.
pub(super) fn reap(conn_child: &mut std::process::Child) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = conn_child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = conn_child.kill();
    let _ = conn_child.wait();
}

/// Adds what ssh printed (e.g. "Connection closed", "Killed") to a lost-link error.
pub(super) fn with_stderr(e: Error, stderr: &std::sync::Mutex<String>) -> Error {
    if e.kind != Kind::Remote {
        return e;
    }
    let text = stderr.lock().map(|s| s.clone()).unwrap_or_default();
    match last_line(&text) {
        Some(line) => Error::new(e.kind, format!("{} ({line})", e.message)),
        None => e,
    }
}
