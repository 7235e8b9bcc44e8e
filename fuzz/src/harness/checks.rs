//! The checks on one decoded frame, and the targets that decode frames and blocks:
//! the per-type decoders, `frame_stream` and `unpack`.

use super::{examples::*, heap::*};
use blocksync::testing::{
    Data, Frame, MAX_BLOCK, MAX_DIGESTS, MAX_FRAME, MAX_SIZE, MAX_TEXT, MIN_BLOCK, Recycler,
    ToDest, ToSource, read_frame_with,
};

/// The checks the decoders promise for each frame they let through.
pub fn check_frame(f: &Frame) {
    match f {
        Frame::Hello(h) => {
            assert!((MIN_BLOCK..=MAX_BLOCK).contains(&h.block), "{h:?}");
            assert!(h.path.len() <= MAX_TEXT, "hello path too long");
            assert!(
                h.refine == 0
                    || (h.refine >= MIN_BLOCK && h.block.div_ceil(h.refine) <= MAX_DIGESTS as u64),
                "{h:?}"
            );
        }
        Frame::Reply(r) => assert!(r.kind <= 2 && r.size <= MAX_SIZE, "{r:?}"),
        Frame::Report(text) => assert!(text.len() <= blocksync::testing::MAX_REPORT),
        Frame::Go(g) => {
            assert!(
                g.start <= g.end && g.end <= g.size && g.size <= MAX_SIZE,
                "{g:?}"
            )
        }
        Frame::Source(ToSource::Digests { blocks, .. })
        | Frame::Source(ToSource::Verify { blocks, .. }) => {
            assert!(blocks.len() <= MAX_DIGESTS)
        }
        Frame::Dest(ToDest::Finding { offset, len, .. }) => {
            assert!(offset.checked_add(*len).is_some())
        }
        Frame::Source(ToSource::Pieces { pieces, .. }) => assert!(pieces.len() <= MAX_DIGESTS),
        Frame::Dest(ToDest::Refine { offset, len })
        | Frame::Dest(ToDest::Check { offset, len }) => {
            assert!(*len <= MAX_BLOCK && offset.checked_add(*len).is_some())
        }
        Frame::Dest(ToDest::Zero { offset, len }) => assert!(offset.checked_add(*len).is_some()),
        Frame::Dest(ToDest::Write { data, .. }) => {
            if let Data::Zstd { len, .. } = data {
                assert!(*len as usize <= MAX_FRAME);
            }
        }
        Frame::Dest(ToDest::Abort { message, .. })
        | Frame::Source(ToSource::Failed { message, .. }) => {
            assert!(message.len() <= MAX_TEXT)
        }
        Frame::Dest(ToDest::Finish { .. })
        | Frame::Source(ToSource::Tally { .. })
        | Frame::Source(ToSource::Done { .. })
        | Frame::Alive => {}
        Frame::Source(ToSource::Bytes { data, .. }) => match *data {},
    }
}

/// The payload the encoder produces for a frame decoded from `payload`: the same bytes,
/// except Go's flag byte, of which the decoder reads two bits (bit 0 proceed, bit 1
/// no_read) and ignores the rest, and which the encoder writes with only those two bits.
fn canonical(t: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = payload.to_vec();
    if t == type_byte(Ty::Go) && !p.is_empty() {
        p[0] &= 0b11;
    }
    p
}

/// One decoder: `Frame::decode` of a `ty` payload.
pub fn decode_as(ty: Ty, payload: &[u8]) {
    let t = type_byte(ty);
    let (decoded, usage) = measure(|| Frame::decode(t, payload));
    assert!(
        usage.peak <= decode_bound(payload.len()),
        "decoding {} payload bytes as {ty:?} held {} bytes",
        payload.len(),
        usage.peak
    );
    let Ok(frame) = decoded else { return };
    check_frame(&frame);
    let (t2, p2) = frame.encode();
    assert_eq!(t2, t, "{frame:?} re-encodes as another type");
    assert_eq!(p2, canonical(t, payload), "{frame:?} does not round-trip");
    let again = Frame::decode(t2, &p2).expect("a re-encoded frame decodes");
    assert_eq!(again, frame);
    // The streaming writer (which writes block data without copying) agrees.
    let w = wire(&frame);
    assert_eq!(&w[..4], &((p2.len() + 1) as u32).to_le_bytes());
    assert_eq!(w[4], t);
    assert_eq!(&w[5..], &p2[..]);
}

/// Target `frame_stream`: `read_frame` over a byte stream, frame after frame, as each
/// side reads its peer; then again the way a destination reads, raw blocks going into
/// recycled, page-aligned buffers.
pub fn frame_stream(data: &[u8]) {
    stream_frames(data, None);
    stream_frames(data, Some(&Recycler::new(2)));
}

fn stream_frames(data: &[u8], recycler: Option<&Recycler>) {
    let mut r = data;
    let mut buf = Vec::new();
    loop {
        let before = r.len();
        let (read, usage) = measure(|| read_frame_with(&mut r, &mut buf, recycler));
        assert!(
            usage.peak <= read_bound(before),
            "reading a frame from {before} bytes held {}",
            usage.peak
        );
        let Ok((frame, n)) = read else { return };
        let consumed = &data[data.len() - before..data.len() - r.len()];
        assert_eq!(n, consumed.len(), "{frame:?}: wrong size on the wire");
        check_frame(&frame);
        let t = consumed[4];
        let mut expect = consumed[..5].to_vec();
        expect.extend_from_slice(&canonical(t, &consumed[5..]));
        assert_eq!(wire(&frame), expect, "{frame:?} does not round-trip");
    }
}

/// Target `unpack`: the zstd decoder, on the bytes of a Write frame after its offset and
/// codec (the stated length, then the compressed bytes).
pub fn unpack(data: &[u8]) {
    let mut payload = vec![0u8; 8];
    payload.push(1); // codec: zstd
    payload.extend_from_slice(data);
    // Only what the frame decoder lets through can reach unpack.
    let Ok(Frame::Dest(ToDest::Write { data: packed, .. })) =
        Frame::decode(type_byte(Ty::Write), &payload)
    else {
        return;
    };
    let Data::Zstd { len, .. } = packed else {
        panic!("codec 1 decoded as raw")
    };
    let len = len as usize;
    // As the sync's receiver unpacks (into recycled, aligned buffers), then plainly.
    let recycler = Recycler::new(2);
    let (aligned, usage) = measure(|| packed.clone().unpack_with(Some(&recycler)));
    assert!(
        usage.peak <= len + data.len() + 2 * 4096,
        "unpacking to {len} bytes into a recycled buffer held {}",
        usage.peak
    );
    let (out, usage) = measure(|| packed.unpack());
    assert!(
        usage.peak <= len + data.len() + 4096,
        "unpacking to {len} bytes held {}",
        usage.peak
    );
    assert_eq!(aligned.is_ok(), out.is_ok(), "the two ways disagree");
    let Ok(out) = out else { return };
    assert_eq!(out.len(), len, "unpacked to another length than stated");
    assert_eq!(
        aligned.expect("checked"),
        out,
        "the two ways unpack differently"
    );
    // Small enough to be cheap: what unpacks packs and unpacks to the same bytes.
    if len <= 256 << 10 {
        let again = Data::pack(&out, 1).unpack().expect("own packing unpacks");
        assert_eq!(again, out);
    }
}
