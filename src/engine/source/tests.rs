//! The source half against a scripted destination, for what no real destination can
//! provoke on cue: the source changing between the compare and the send.

use super::run;
use crate::digestfile::cache::Cache;
use crate::digestfile::format::{DigestFile, DigestWriter, Header};
use crate::engine::blockhash::block_infos;
use crate::engine::messages::{ToDest, ToSource};
use crate::engine::prehash::Precomputed;
use crate::engine::{Compare, Config, Layout, Stats};
use crate::hash::{BlockInfo, HashKind};
use crossbeam_channel::bounded;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

const BLOCK: usize = 4096;
const SIZE: usize = 2 * BLOCK;
const KIND: HashKind = HashKind::Xxh3;

fn layout() -> Layout {
    Layout {
        size: SIZE as u64,
        start: 0,
        end: SIZE as u64,
        block: BLOCK as u64,
        chunk: SIZE as u64,
        open_end: false,
    }
}

fn filled(bytes: [u8; 2]) -> Vec<u8> {
    [vec![bytes[0]; BLOCK], vec![bytes[1]; BLOCK]].concat()
}

/// A config comparing by digest and recording a digest file at `dig`.
fn config(dig: &Path) -> Config {
    let header = Header {
        hash: KIND,
        block: BLOCK as u64,
        size: SIZE as u64,
        target_size: SIZE as u64,
        sync_id: [0; 16],
        label: "dst".into(),
    };
    let writer = DigestWriter::create(dig, header).unwrap();
    let cache = Cache::new(
        KIND,
        "dig".into(),
        "dst".into(),
        None,
        vec![],
        Some(writer),
        1,
    );
    let mut config = Config::build(layout(), &Default::default());
    config.compare = Compare::Digest(KIND);
    config.cache = Some(Arc::new(cache.unwrap()));
    config
}

/// Runs the source half on `src` against a destination holding `dest`, which calls
/// `on_refine` before answering each refinement question; returns what the destination
/// holds afterwards and the digest file's entries.
fn sync(
    src: &Path,
    dig: &Path,
    config: Config,
    mut dest: Vec<u8>,
    on_refine: impl Fn() + std::marker::Send,
) -> (Vec<u8>, Vec<BlockInfo>) {
    let target = crate::io::target::open_source(src).unwrap();
    let (to_dest, from_source) = bounded::<ToDest>(64);
    let (to_source, from_dest) = bounded::<ToSource>(64);
    let stats = Stats::default();
    let result = std::thread::scope(|s| {
        let dest = &mut dest;
        s.spawn(move || {
            let blocks = block_infos(KIND, dest, SIZE, BLOCK, &[]);
            to_source
                .send(ToSource::Digests { index: 0, blocks })
                .unwrap();
            for msg in from_source {
                let reply = match msg {
                    ToDest::Write { offset, data } => {
                        let at = offset as usize;
                        dest[at..at + data.len()].copy_from_slice(&data);
                        continue;
                    }
                    ToDest::Refine { offset, len } => {
                        on_refine();
                        let r = offset as usize..(offset + len) as usize;
                        let pieces = block_infos(KIND, &dest[r], len as usize, 1024, &[]);
                        ToSource::Pieces { offset, pieces }
                    }
                    ToDest::Finish { .. } => ToSource::Done {
                        written: 0,
                        read: 0,
                        journaled: 0,
                    },
                    ToDest::Abort { .. } => return,
                    _ => continue,
                };
                to_source.send(reply).unwrap();
            }
        });
        run(
            &target,
            &config,
            to_dest,
            from_dest,
            &stats,
            &AtomicBool::new(false),
        )
    });
    result.unwrap();
    let cache = config.cache.unwrap();
    Arc::into_inner(cache).unwrap().finish(true, &[]).unwrap();
    let recorded = DigestFile::open(dig).unwrap().entries(0, 2).unwrap();
    (dest, recorded)
}

#[test]
fn the_digest_file_records_the_bytes_sent_for_a_chunk_hashed_ahead() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dig) = (dir.path().join("src"), dir.path().join("dig"));
    // Hashed ahead as 1 1, then the source changed to 2 2 before the sync sent it (which
    // reads it again: the chunk's bytes were not read for the compare).
    let ahead = block_infos(KIND, &filled([1, 1]), SIZE, BLOCK, &[]);
    std::fs::write(&src, filled([2, 2])).unwrap();
    let mut config = config(&dig);
    config.precomputed = Some(Arc::new(Precomputed::from_digests(
        SIZE as u64,
        vec![ahead],
    )));
    let (dest, recorded) = sync(&src, &dig, config, filled([3, 3]), || {});
    assert!(
        dest == filled([2, 2]),
        "the destination got what the source holds now"
    );
    assert_eq!(recorded, block_infos(KIND, &dest, SIZE, BLOCK, &[]));
}

#[test]
fn the_digest_file_records_the_bytes_sent_for_a_refined_block() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dig) = (dir.path().join("src"), dir.path().join("dig"));
    std::fs::write(&src, filled([1, 2])).unwrap();
    let mut config = config(&dig);
    config.refine = 1024;
    // Block 1 differs, so it is refined; while the question is out, the source's block
    // changes to 4s, which is what the answer then reads and sends.
    let change = || {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
        f.write_all_at(&[4; BLOCK], BLOCK as u64).unwrap();
    };
    let (dest, recorded) = sync(&src, &dig, config, filled([1, 3]), change);
    assert!(
        dest == filled([1, 4]),
        "the destination got the re-read bytes"
    );
    assert_eq!(recorded, block_infos(KIND, &dest, SIZE, BLOCK, &[]));
}

#[test]
fn after_an_interruption_a_failed_flush_is_the_news() {
    use super::first_cause;
    use crate::error::{Error, Kind};
    let err = |k: Kind| Err(Error::new(k, format!("{k:?}")));
    let kind = |r: crate::error::Result<()>| r.err().map(|e| e.kind);
    // Interrupted, and the destination flushed what it had (it says it stopped early).
    assert_eq!(
        kind(first_cause(err(Kind::Interrupted), err(Kind::Protocol))),
        Some(Kind::Interrupted)
    );
    // Interrupted, and the destination could not write or flush: that is reported.
    assert_eq!(
        kind(first_cause(err(Kind::Interrupted), err(Kind::Io))),
        Some(Kind::Io)
    );
    // Any other cause stays the cause.
    assert_eq!(
        kind(first_cause(err(Kind::Source), err(Kind::Io))),
        Some(Kind::Source)
    );
    assert_eq!(kind(first_cause(Ok(()), err(Kind::Io))), Some(Kind::Io));
    assert_eq!(kind(first_cause(Ok(()), Ok(()))), None);
}
