//! Frames round-trip, and every malformed input is an error, never a panic.

use super::*;
use crate::hash::HashKind;
use crate::io::pool::Recycler;

fn samples() -> Vec<Frame> {
    vec![
        Frame::Hello(Hello {
            role: Role::Dest,
            path: "/srv/a file with spaces;$(x)".into(),
            block: 1 << 20,
            hash: HashKind::Blake3,
            compress: 3,
            flags: FLAG_DRY_RUN | FLAG_DROP_CACHE,
            pause_ms: 5,
            source_size: 12345,
            bwlimit: 1 << 20,
            refine: 4096,
            max_errors: u64::MAX,
            source_mode: 0o640,
            run: RunPart {
                streams: 1,
                ..Default::default()
            },
        }),
        Frame::Hello(Hello {
            role: Role::Restore,
            path: "/srv/vm.img".into(),
            block: 1 << 20,
            hash: HashKind::Blake3,
            compress: 0,
            flags: FLAG_UNCHECKED,
            pause_ms: 0,
            source_size: 0,
            bwlimit: 0,
            refine: 0,
            max_errors: 0,
            source_mode: 0,
            run: RunPart {
                streams: 1,
                keep: Some(3),
                version: 2,
                out: "/srv/old.img".into(),
                ..Default::default()
            },
        }),
        Frame::Report("{\"versions\":[]}".into()),
        Frame::Reply(Reply {
            size: 99,
            kind: 2,
            sync_id: [3; 16],
            mode: 0o600,
            journal: 0,
            data: 0,
        }),
        Frame::Dest(ToDest::Check {
            offset: 1 << 20,
            len: 4096,
        }),
        Frame::Go(Go {
            proceed: true,
            size: 100,
            start: 0,
            end: 100,
            sync_id: [9; 16],
            no_read: true,
        }),
        Frame::Source(ToSource::Digests {
            index: 7,
            blocks: vec![
                BlockInfo::Digest(HashKind::Blake3.block_digest(b"a")),
                BlockInfo::Zero,
                BlockInfo::Missing,
                BlockInfo::Digest(HashKind::Xxh3.block_digest(b"b")),
            ],
        }),
        Frame::Source(ToSource::Verify {
            index: 3,
            blocks: vec![
                BlockInfo::Digest(HashKind::Blake3.digest(b"full")),
                BlockInfo::Zero,
            ],
        }),
        Frame::Dest(ToDest::Finding {
            kind: FindingKind::SourceChanged,
            offset: 512,
            len: 4096,
        }),
        Frame::Dest(ToDest::Zero {
            offset: 1 << 30,
            len: 1 << 20,
        }),
        Frame::Dest(ToDest::Refine {
            offset: 1 << 20,
            len: 1 << 20,
        }),
        Frame::Source(ToSource::Pieces {
            offset: 1 << 20,
            pieces: vec![
                BlockInfo::Zero,
                BlockInfo::Digest(HashKind::Blake3.block_digest(b"c")),
            ],
        }),
        Frame::Dest(ToDest::Write {
            offset: 1 << 40,
            data: Data::Raw(Slice::owned(vec![1, 2, 3])),
        }),
        Frame::Dest(ToDest::Write {
            offset: 4096,
            data: Data::pack(&Slice::owned(vec![0u8; 65536]), 3),
        }),
        Frame::Dest(ToDest::Finish {
            size: 5,
            counts: Counts {
                read: 1,
                same: 2,
                changed: 3,
                changed_bytes: 4,
                zero: 5,
                holes: 6,
                zeroed: 7,
            },
        }),
        Frame::Dest(ToDest::Abort {
            kind: Kind::Io,
            message: "reading source: EIO".into(),
        }),
        Frame::Source(ToSource::Done {
            written: 77,
            read: 78,
            journaled: 79,
        }),
        Frame::Source(ToSource::Failed {
            kind: Kind::TooSmall,
            message: "déjà vu".into(),
        }),
    ]
}

fn bytes(f: &Frame) -> Vec<u8> {
    let mut out = Vec::new();
    write_frame(&mut out, f).unwrap();
    out
}

#[test]
fn frames_round_trip() {
    let mut buf = Vec::new();
    for f in samples() {
        let wire = bytes(&f);
        let (back, n) = read_frame(&mut &wire[..], &mut buf).unwrap();
        assert_eq!(back, f);
        assert_eq!(n, wire.len());
    }
    let zeros = Slice::owned(vec![0u8; 65536]);
    assert!(matches!(
        Data::pack(&zeros, 3),
        Data::Zstd { len: 65536, .. }
    ));
    assert_eq!(Data::pack(&zeros, 3).unpack().unwrap(), zeros);
    let mut noise = vec![0u8; 4096];
    blake3::Hasher::new().finalize_xof().fill(&mut noise);
    let noise = Slice::owned(noise);
    assert!(matches!(Data::pack(&noise, 3), Data::Raw(_)));
}

#[test]
fn raw_blocks_arrive_page_aligned_for_direct_writes() {
    let recycler = Recycler::new(2);
    let mut noise = vec![0u8; 300 << 10];
    blake3::Hasher::new().finalize_xof().fill(&mut noise);
    let frames = [
        Frame::Dest(ToDest::Write {
            offset: 4096,
            data: Data::Raw(Slice::owned(noise.clone())),
        }),
        Frame::Dest(ToDest::Zero { offset: 0, len: 9 }),
        Frame::Dest(ToDest::Write {
            offset: 1 << 20,
            data: Data::Raw(Slice::owned(noise[..5].to_vec())),
        }),
        Frame::Dest(ToDest::Refine {
            offset: 1 << 20,
            len: 1 << 16,
        }),
    ];
    let wire: Vec<u8> = frames.iter().flat_map(bytes).collect();
    let mut r = &wire[..];
    let mut buf = Vec::new();
    for want in &frames {
        let (got, _) = read_frame_with(&mut r, &mut buf, Some(&recycler)).unwrap();
        assert_eq!(&got, want);
        if let Frame::Dest(ToDest::Write {
            data: Data::Raw(d), ..
        }) = &got
        {
            assert!(
                d.as_ptr()
                    .addr()
                    .is_multiple_of(crate::io::target::DIRECT_ALIGN)
            );
        }
    }
    // Cut inside a raw block's header or bytes: an error, as without a recycler.
    let one = bytes(&frames[0]);
    for cut in [5, 10, 4 + 10 + 1000, one.len() - 1] {
        assert!(read_frame_with(&mut &one[..cut], &mut buf, Some(&recycler)).is_err());
    }
}

#[test]
fn every_truncation_is_an_error() {
    let mut buf = Vec::new();
    for f in samples() {
        let wire = bytes(&f);
        for cut in 0..wire.len() {
            assert!(
                read_frame(&mut &wire[..cut], &mut buf).is_err(),
                "{f:?} cut {cut}"
            );
        }
        let (t, p) = f.encode();
        for cut in 0..p.len() {
            // A Write's data may legally be shorter; every other frame must fail.
            if t != T_WRITE || cut < 9 {
                assert!(Frame::decode(t, &p[..cut]).is_err(), "{f:?} cut {cut}");
            }
        }
    }
}

#[test]
fn trailing_bytes_oversize_and_unknowns_are_rejected() {
    let (t, mut p) = Frame::Source(ToSource::Done {
        written: 1,
        read: 2,
        journaled: 3,
    })
    .encode();
    p.push(0);
    assert_eq!(Frame::decode(t, &p), Err(DecodeError::Trailing(1)));
    let huge = ((MAX_FRAME + 1) as u32).to_le_bytes();
    let mut buf = Vec::new();
    assert!(matches!(
        read_frame(&mut &huge[..], &mut buf),
        Err(ReadError::Decode(DecodeError::TooLarge(_)))
    ));
    assert!(Frame::decode(99, &[]).is_err());
    let mut hello = samples()[0].encode().1;
    hello[8] = 9; // version
    assert_eq!(Frame::decode(T_HELLO, &hello), Err(DecodeError::Version(9)));
    let mut digests = Vec::new();
    digests.extend_from_slice(&0u64.to_le_bytes());
    digests.extend_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(
        Frame::decode(T_DIGESTS, &digests),
        Err(DecodeError::TooLarge("digest count"))
    );
    // A zstd payload that claims more than it holds.
    let (t, mut w) = Frame::Dest(ToDest::Write {
        offset: 0,
        data: Data::pack(&Slice::owned(vec![0u8; 65536]), 3),
    })
    .encode();
    w[9..13].copy_from_slice(&65537u32.to_le_bytes());
    let Frame::Dest(ToDest::Write { data, .. }) = Frame::decode(t, &w).unwrap() else {
        panic!()
    };
    assert_eq!(data.unpack(), Err(DecodeError::BadCompression));
}

/// Found by fuzz target handshake_client: a Reply of almost 2^64 bytes overflowed the
/// client's range arithmetic (Layout::part) in a pull. No file is that large.
#[test]
fn sizes_past_off_t_are_rejected() {
    let reply = |size: u64| {
        let r = Reply {
            size,
            kind: 1,
            sync_id: [0; 16],
            mode: 0o644,
            journal: 0,
            data: 0,
        };
        Frame::Reply(r).encode().1
    };
    let go = |size: u64| {
        let g = Go {
            proceed: true,
            size,
            start: 0,
            end: size,
            sync_id: [0; 16],
            no_read: false,
        };
        Frame::Go(g).encode().1
    };
    assert!(Frame::decode(T_REPLY, &reply(MAX_SIZE)).is_ok());
    assert!(Frame::decode(T_GO, &go(MAX_SIZE)).is_ok());
    for size in [MAX_SIZE + 1, u64::MAX] {
        let too_large = Err(DecodeError::TooLarge("size"));
        assert_eq!(Frame::decode(T_REPLY, &reply(size)), too_large);
        assert_eq!(Frame::decode(T_GO, &go(size)), too_large);
    }
}

/// Property test: random and mutated frames decode to an error or a frame, never panic,
/// and never allocate past the bound.
#[test]
fn random_and_mutated_input_never_panics() {
    let mut x: u64 = 0x1234_5678_9abc_def1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let wires: Vec<Vec<u8>> = samples().iter().map(bytes).collect();
    let mut buf = Vec::new();
    for round in 0..20_000 {
        let mut w = if round % 4 == 0 {
            let n = (next() % 64) as usize;
            (0..n).map(|_| next() as u8).collect()
        } else {
            wires[(next() % wires.len() as u64) as usize].clone()
        };
        for _ in 0..1 + next() % 4 {
            if w.is_empty() {
                break;
            }
            let i = (next() % w.len() as u64) as usize;
            match next() % 3 {
                0 => w[i] = next() as u8,
                1 => w.truncate(i),
                _ => w.insert(i, next() as u8),
            }
        }
        if let Ok((Frame::Dest(ToDest::Write { data, .. }), _)) = read_frame(&mut &w[..], &mut buf)
        {
            let _ = data.unpack();
        }
    }
}

#[test]
fn file_modes_past_the_permission_bits_are_rejected() {
    let reply = |mode: u32| {
        let r = Reply {
            size: 1,
            kind: 1,
            sync_id: [0; 16],
            mode,
            journal: 0,
            data: 0,
        };
        let (t, p) = Frame::Reply(r).encode();
        Frame::decode(t, &p)
    };
    assert!(reply(0o777).is_ok());
    // A hostile peer must not get a setuid file created on this side.
    assert_eq!(
        reply(0o4755),
        Err(DecodeError::Unknown("file mode", 0o4755))
    );
}
