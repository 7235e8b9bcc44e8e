//! The transmission phase against scripted servers: malformed, oversized and truncated
//! replies are protocol errors that every waiter sees, never panics or hangs.

use crate::error::Kind;
use crate::io::nbd::conn::{Conn, Request};
use crate::io::nbd::fake::{chunk, conn, simple};
use crate::io::nbd::wire::*;

const DONE: u16 = REPLY_FLAG_DONE;

fn read(c: &mut Conn, offset: u64, len: u32) -> crate::error::Result<Vec<u8>> {
    let req = Request {
        cmd: CMD_READ,
        flags: 0,
        offset,
        len,
    };
    let h = c.submit(req, &[])?;
    Ok(c.wait(h)?.data)
}

fn data(offset: u64, bytes: &[u8]) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend_from_slice(bytes);
    p
}

fn hole(offset: u64, len: u32) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend_from_slice(&len.to_be_bytes());
    p
}

/// Structured replies with one bad reply for a read of 8 bytes at 100.
fn bad_read(replies: Vec<u8>) -> crate::error::Error {
    let mut c = conn(true, vec![], 1, replies, false);
    read(&mut c, 100, 8).unwrap_err()
}

#[test]
fn reads_assemble_data_and_hole_chunks_in_any_order() {
    let mut r = chunk(0, CHUNK_OFFSET_HOLE, 1, &hole(104, 4), None);
    r.extend(chunk(DONE, CHUNK_OFFSET_DATA, 1, &data(100, b"abcd"), None));
    r.extend(simple(0, 2, &[]));
    let mut c = conn(true, vec![], 2, r, false);
    let h = c.submit(req(CMD_READ, 100, 8), &[]).unwrap();
    let w = c.submit(req(CMD_WRITE, 0, 3), b"xyz").unwrap();
    assert!(c.wait(w).unwrap().data.is_empty());
    assert_eq!(c.wait(h).unwrap().data, b"abcd\0\0\0\0");
    c.close().unwrap();
}

fn req(cmd: u16, offset: u64, len: u32) -> Request {
    Request {
        cmd,
        flags: 0,
        offset,
        len,
    }
}

#[test]
fn malformed_read_replies_are_protocol_errors() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            chunk(DONE, CHUNK_OFFSET_DATA, 1, &data(100, b"abc"), None),
            "covered 3 of 8",
        ),
        (
            chunk(DONE, CHUNK_OFFSET_DATA, 1, &data(98, b"abcdefgh"), None),
            "outside",
        ),
        (
            chunk(DONE, CHUNK_OFFSET_DATA, 1, &[], Some(u32::MAX)),
            "data chunk of",
        ),
        (
            chunk(DONE, CHUNK_OFFSET_DATA, 1, &data(100, b""), None),
            "data chunk of 8",
        ),
        (
            chunk(DONE, CHUNK_OFFSET_HOLE, 1, &hole(100, 0), None),
            "length 0",
        ),
        (
            chunk(DONE, CHUNK_OFFSET_HOLE, 1, &hole(104, 8), None),
            "outside",
        ),
        (
            chunk(DONE, CHUNK_OFFSET_DATA, 7, &data(100, b"abcdefgh"), None),
            "handle 7",
        ),
        (chunk(DONE, 42, 1, &[], None), "type 42"),
        (chunk(DONE, CHUNK_BLOCK_STATUS, 1, &[0; 12], None), "type 5"),
        (chunk(0, CHUNK_NONE, 1, &[], None), "NONE"),
        (
            chunk(DONE, CHUNK_ERROR, 1, &[], Some(1 << 30)),
            "error chunk of",
        ),
        (simple(0, 1, b"abcdefgh"), "simple reply with data"),
        (b"\xde\xad\xbe\xef".to_vec(), "magic 0xdeadbeef"),
    ];
    for (replies, says) in cases {
        let e = bad_read(replies);
        assert_eq!(e.kind, Kind::Protocol, "{says}: {e}");
        assert!(e.message.contains(says), "{says}: {e}");
    }
}

#[test]
fn a_server_error_fails_one_request_and_the_connection_goes_on() {
    let mut err = 5u32.to_be_bytes().to_vec();
    err.extend_from_slice(&4u16.to_be_bytes());
    err.extend_from_slice(b"bad\x07");
    let mut r = chunk(DONE, CHUNK_ERROR, 1, &err, None);
    r.extend(chunk(DONE, CHUNK_OFFSET_DATA, 2, &data(0, b"ok"), None));
    r.extend(simple(28, 3, &[]));
    let mut c = conn(true, vec![], 3, r, false);
    let a = c.submit(req(CMD_READ, 100, 8), &[]).unwrap();
    let b = c.submit(req(CMD_READ, 0, 2), &[]).unwrap();
    let w = c.submit(req(CMD_WRITE, 0, 1), b"x").unwrap();
    let e = c.wait(a).unwrap_err();
    assert_eq!(e.kind, Kind::Io);
    assert!(
        e.message
            .contains("read at offset 100 (+8) failed: I/O error: bad\\x07"),
        "{e}"
    );
    assert_eq!(c.wait(b).unwrap().data, b"ok");
    assert!(c.wait(w).unwrap_err().message.contains("no space left"));
}

#[test]
fn simple_replies_carry_data_without_structured_replies() {
    let mut r = simple(0, 1, b"abcdefgh");
    r.extend(simple(0, 2, &[]));
    let mut c = conn(false, vec![], 2, r, false);
    let h = c.submit(req(CMD_READ, 100, 8), &[]).unwrap();
    let f = c.submit(req(CMD_FLUSH, 0, 0), &[]).unwrap();
    assert_eq!(c.wait(h).unwrap().data, b"abcdefgh");
    c.wait(f).unwrap();
    let mut c = conn(
        false,
        vec![],
        1,
        chunk(DONE, CHUNK_NONE, 1, &[], None),
        false,
    );
    let e = read(&mut c, 0, 8).unwrap_err();
    assert!(e.message.contains("not negotiated"), "{e}");
}

fn status(id: u32, descs: &[(u32, u32)]) -> Vec<u8> {
    let mut p = id.to_be_bytes().to_vec();
    for (len, flags) in descs {
        p.extend_from_slice(&len.to_be_bytes());
        p.extend_from_slice(&flags.to_be_bytes());
    }
    p
}

#[test]
fn block_status_is_clipped_merged_and_checked() {
    let mut r = chunk(
        0,
        CHUNK_BLOCK_STATUS,
        1,
        &status(3, &[(512, 3), (512, 3), (1024, 0)]),
        None,
    );
    r.extend(chunk(
        DONE,
        CHUNK_BLOCK_STATUS,
        1,
        &status(4, &[(4096, 1)]),
        None,
    ));
    let mut c = conn(true, vec![3, 4], 1, r, false);
    let h = c.submit(req(CMD_BLOCK_STATUS, 0, 1536), &[]).unwrap();
    let got = c.wait(h).unwrap().extents;
    let e = |offset, length, flags| crate::io::nbd::Extent {
        offset,
        length,
        flags,
    };
    assert_eq!(got[0], (3, vec![e(0, 1024, 3), e(1024, 512, 0)]));
    assert_eq!(got[1], (4, vec![e(0, 1536, 1)]));

    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            chunk(DONE, CHUNK_BLOCK_STATUS, 1, &status(9, &[(512, 0)]), None),
            "id 9",
        ),
        (
            chunk(DONE, CHUNK_BLOCK_STATUS, 1, &status(3, &[(0, 0)]), None),
            "length 0",
        ),
        (
            chunk(DONE, CHUNK_BLOCK_STATUS, 1, &status(3, &[]), None),
            "chunk of 4",
        ),
        (
            chunk(
                DONE,
                CHUNK_BLOCK_STATUS,
                1,
                &[0; 3],
                Some(4 + 8 * (MAX_DESCRIPTORS + 1)),
            ),
            "descriptors",
        ),
        (chunk(DONE, CHUNK_NONE, 1, &[], None), "without extents"),
        (simple(0, 1, &[]), "simple reply"),
        (
            [
                chunk(0, CHUNK_BLOCK_STATUS, 1, &status(3, &[(512, 0)]), None),
                chunk(DONE, CHUNK_BLOCK_STATUS, 1, &status(3, &[(512, 0)]), None),
            ]
            .concat(),
            "twice",
        ),
    ];
    for (replies, says) in cases {
        let mut c = conn(true, vec![3], 1, replies, false);
        let h = c.submit(req(CMD_BLOCK_STATUS, 0, 1536), &[]).unwrap();
        let e = c.wait(h).unwrap_err();
        assert_eq!(e.kind, Kind::Protocol, "{says}: {e}");
        assert!(e.message.contains(says), "{says}: {e}");
    }
}

#[test]
fn a_closed_connection_and_a_full_window_are_errors() {
    let mut c = conn(true, vec![], 1, Vec::new(), true);
    let e = read(&mut c, 0, 8).unwrap_err();
    assert!(e.message.contains("closed the connection"), "{e}");
    assert!(
        read(&mut c, 0, 8).is_err(),
        "a broken connection stays broken"
    );

    let mut c = conn(true, vec![], 0, Vec::new(), false);
    let mut hs = Vec::new();
    while c.has_room(0) {
        hs.push(c.submit(req(CMD_FLUSH, 0, 0), &[]).unwrap());
    }
    assert_eq!(hs.len(), 4);
    let e = c.submit(req(CMD_FLUSH, 0, 0), &[]).unwrap_err();
    assert_eq!(e.kind, Kind::Internal);
    assert!(e.message.contains("too many requests"), "{e}");
    assert!(!c.has_room(0));
}
