//! Seed conversations for the handshake targets.

use super::examples::*;
use blocksync::error::Kind;
use blocksync::testing::{
    Counts, Data, FLAG_NO_READ, FLAG_TRACK_ID, FLAG_VERIFY, Frame, GREETING, Go, HashKind, Reply,
    Role, Slice, ToDest, ToSource,
};

/// Seeds for `handshake_server`: pushes, `--digest-file` pushes, pulls.
pub(super) fn server_seeds() -> Vec<Vec<u8>> {
    let mut seeds = push_seeds();
    seeds.extend(tracked_push_seeds());
    seeds.extend(pull_seeds());
    seeds
}

/// The size of the file the server seeds sync.
const SIZE: u64 = 1 << 20;

/// A Go for the whole file, without a sync id.
fn whole_go() -> Frame {
    Frame::Go(Go {
        proceed: true,
        size: SIZE,
        start: 0,
        end: SIZE,
        sync_id: NO_ID,
        no_read: false,
    })
}

/// Pushes: blocks of each kind and a Finish, an Abort, a Go that does not proceed.
fn push_seeds() -> Vec<Vec<u8>> {
    let size = SIZE;
    let go = whole_go();
    let push = Frame::Hello(hello(Role::Dest, "/tmp/x", 4096, HashKind::Blake3, 512));
    let finish = Frame::Dest(ToDest::Finish {
        size,
        counts: Counts::default(),
    });
    vec![
        conversation(&[
            push.clone(),
            go.clone(),
            Frame::Dest(ToDest::Write {
                offset: 0,
                data: Data::Raw(Slice::owned(vec![7; 100])),
            }),
            Frame::Dest(ToDest::Write {
                offset: 4096,
                data: Data::pack(&Slice::owned(text(4096)), 1),
            }),
            Frame::Dest(ToDest::Zero {
                offset: 8192,
                len: 4096,
            }),
            Frame::Dest(ToDest::Refine {
                offset: 0,
                len: 4096,
            }),
            finish,
        ]),
        conversation(&[
            push.clone(),
            go.clone(),
            Frame::Dest(ToDest::Abort {
                kind: Kind::Io,
                message: "EIO".into(),
            }),
        ]),
        conversation(&[
            push,
            Frame::Go(Go {
                proceed: false,
                size: 0,
                start: 0,
                end: 0,
                sync_id: NO_ID,
                no_read: false,
            }),
        ]),
    ]
}

/// Pushes with --digest-file: the destination tracks the sync id and, the source having
/// its digests, does not read itself; the source spot-checks a few blocks.
fn tracked_push_seeds() -> Vec<Vec<u8>> {
    let size = SIZE;
    let mut tracked = hello(Role::Dest, "/tmp/x", 4096, HashKind::Blake3, 0);
    tracked.flags |= FLAG_TRACK_ID | FLAG_NO_READ | FLAG_VERIFY;
    let no_read_go = Frame::Go(Go {
        proceed: true,
        size,
        start: 0,
        end: size,
        sync_id: SYNC_ID,
        no_read: true,
    });
    vec![
        conversation(&[
            Frame::Hello(tracked.clone()),
            no_read_go,
            Frame::Dest(ToDest::Check {
                offset: 0,
                len: 4096,
            }),
            Frame::Dest(ToDest::Check {
                offset: size - 4096,
                len: 4096,
            }),
            Frame::Dest(ToDest::Write {
                offset: 4096,
                data: Data::Raw(Slice::owned(vec![7; 4096])),
            }),
            Frame::Dest(ToDest::Zero {
                offset: 8192,
                len: 4096,
            }),
            Frame::Dest(ToDest::Finish {
                size,
                counts: Counts::default(),
            }),
            // The verify pass the Hello asks for.
            Frame::Dest(ToDest::Finish {
                size,
                counts: Counts::default(),
            }),
        ]),
        conversation(&[
            Frame::Hello(tracked),
            Frame::Go(Go {
                proceed: true,
                size,
                start: size / 2,
                end: size,
                sync_id: SYNC_ID,
                no_read: true,
            }),
            Frame::Dest(ToDest::Check {
                offset: size / 2,
                len: 4096,
            }),
            Frame::Dest(ToDest::Abort {
                kind: Kind::Io,
                message: "EIO".into(),
            }),
        ]),
    ]
}

/// Pulls: digests and piece digests coming back, then Done, or a failure.
fn pull_seeds() -> Vec<Vec<u8>> {
    let go = whole_go();
    let pull = Frame::Hello(hello(Role::Source, "/tmp/x", 4096, HashKind::Xxh3, 512));
    vec![
        conversation(&[
            pull.clone(),
            go.clone(),
            Frame::Source(ToSource::Digests {
                index: 0,
                blocks: infos(8),
            }),
            Frame::Source(ToSource::Pieces {
                offset: 0,
                pieces: infos(8),
            }),
            Frame::Source(ToSource::Done {
                written: 1,
                read: 2,
                journaled: 3,
            }),
        ]),
        conversation(&[
            pull,
            go,
            Frame::Source(ToSource::Failed {
                kind: Kind::Destination,
                message: "no space".into(),
            }),
        ]),
    ]
}

/// Seeds for `handshake_client`: what a server sends in a push, a pull, a refusal, a
/// tracked push answering spot-checks, and an empty source.
pub(super) fn client_seeds() -> Vec<Vec<u8>> {
    let greeted = |frames: &[Frame]| {
        let mut out = GREETING.to_vec();
        out.extend(conversation(frames));
        out
    };
    let reply = Frame::Reply(Reply {
        size: 1 << 20,
        kind: 1,
        sync_id: NO_ID,
        mode: 0o644,
        journal: 0,
        data: 0,
    });
    // A destination that recorded a sync (asked with FLAG_TRACK_ID), answering spot-checks.
    let tracked = Frame::Reply(Reply {
        size: 1 << 20,
        kind: 2,
        sync_id: SYNC_ID,
        mode: 0o644,
        journal: 0,
        data: 0,
    });
    vec![
        greeted(&[
            reply.clone(),
            Frame::Source(ToSource::Digests {
                index: 0,
                blocks: infos(8),
            }),
            Frame::Source(ToSource::Pieces {
                offset: 0,
                pieces: infos(8),
            }),
            Frame::Source(ToSource::Done {
                written: 1,
                read: 2,
                journaled: 3,
            }),
        ]),
        greeted(&[
            reply,
            Frame::Dest(ToDest::Write {
                offset: 0,
                data: Data::Raw(Slice::owned(vec![7; 100])),
            }),
            Frame::Dest(ToDest::Zero {
                offset: 4096,
                len: 4096,
            }),
            Frame::Dest(ToDest::Finish {
                size: 1 << 20,
                counts: Counts::default(),
            }),
        ]),
        greeted(&[Frame::Source(ToSource::Failed {
            kind: Kind::Destination,
            message: "refused".into(),
        })]),
        greeted(&[
            tracked,
            Frame::Source(ToSource::Pieces {
                offset: 0,
                pieces: infos(1),
            }),
            Frame::Source(ToSource::Pieces {
                offset: (1 << 20) - 4096,
                pieces: infos(3)[2..].to_vec(),
            }),
            Frame::Source(ToSource::Done {
                written: 4096,
                read: 8192,
                journaled: 0,
            }),
        ]),
        greeted(&[Frame::Reply(Reply {
            size: 0,
            kind: 0,
            sync_id: NO_ID,
            mode: 0o644,
            journal: 0,
            data: 0,
        })]),
    ]
}
