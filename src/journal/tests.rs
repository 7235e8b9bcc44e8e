//! The journal on its own: saved ranges (data, zeros, a cut-off tail) come back exactly,
//! a torn tail is ignored, continued runs roll back to the oldest state, and a journal
//! that is not this user's own is never used.

use super::rollback::rollback;
use super::*;
use crate::io::target::{self, Claim, OpenDest, Target};
use std::os::unix::fs::PermissionsExt;

fn open(path: &Path) -> Target {
    let probe = target::probe_destination(path).unwrap();
    let how = OpenDest {
        force_mounted: false,
        mode: 0o600,
        shared: false,
        claim: Claim::whole(true),
    };
    target::open_destination(&probe, how).unwrap()
}

fn plan(dir: &Path, t: &Target) -> Plan {
    Plan {
        place: Place::of(&t.path, &t.id, Some(dir)),
        run_id: [9; 16],
        stream: 0,
        streams: 1,
        source: "test".into(),
        keep: None,
    }
}

fn bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Overwrites `at..at + len` of `t` (a run's write), the journal first.
fn overwrite(j: &mut Journal, t: &Target, at: u64, data: &[u8]) {
    j.save(&t.file, at, data.len() as u64).unwrap();
    j.commit().unwrap();
    target::write_full_at(&t.file, data, at).unwrap();
}

#[test]
fn data_zeros_and_a_cut_tail_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d");
    let mut before = bytes(300_000, 1);
    before[100_000..170_000].fill(0);
    std::fs::write(&path, &before).unwrap();
    let t = open(&path);
    let p = plan(dir.path(), &t);
    let mut j = Journal::begin(&p, &t).unwrap();
    overwrite(&mut j, &t, 10, &bytes(5000, 7)); // unaligned, padded
    overwrite(&mut j, &t, 100_000, &bytes(65536, 8)); // over zeros
    j.save(&t.file, 250_000, 50_000).unwrap(); // the tail a shorter source cuts
    j.commit().unwrap();
    t.file.set_len(250_000).unwrap();
    assert_eq!(j.saved(), 5000 + 65536 + 50_000);
    // Saving past the cut would keep bytes that are no longer the old ones: refused.
    assert!(j.save(&t.file, 240_000, 20_000).is_err());
    drop(j); // the run dies
    let done = rollback(&t, &p.place).unwrap();
    assert_eq!(done.journals, 1);
    assert_eq!(done.size, 300_000);
    assert!(std::fs::read(&path).unwrap() == before);
    assert!(p.place.list().unwrap().is_empty(), "removed once restored");
}

#[test]
fn a_torn_tail_is_ignored_and_continued_runs_go_back_to_the_oldest() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d");
    let before = bytes(200_000, 2);
    std::fs::write(&path, &before).unwrap();
    let t = open(&path);
    let p = plan(dir.path(), &t);
    let mut first = Journal::begin(&p, &t).unwrap();
    overwrite(&mut first, &t, 0, &bytes(4096, 3));
    // A group being written when the power went: cut short in the file, and the
    // write it covers never made.
    first.save(&t.file, 8192, 4096).unwrap();
    first.commit().unwrap();
    drop(first);
    let found = p.place.list().unwrap();
    let len = std::fs::metadata(&found[0].path).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&found[0].path)
        .unwrap();
    f.set_len(len - 2048).unwrap();
    // The next run continues: it overwrites the same range again, and another.
    let mut second = Journal::begin(&p, &t).unwrap();
    overwrite(&mut second, &t, 0, &bytes(4096, 4));
    overwrite(&mut second, &t, 100_000, &bytes(4096, 5));
    drop(second);
    assert_eq!(p.place.list().unwrap().len(), 2);
    let done = rollback(&t, &p.place).unwrap();
    assert_eq!((done.journals, done.bytes), (2, 3 * 4096));
    assert!(std::fs::read(&path).unwrap() == before);
}

#[test]
fn a_completed_run_removes_its_journals() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d");
    std::fs::write(&path, bytes(10_000, 1)).unwrap();
    let t = open(&path);
    let p = plan(dir.path(), &t);
    let mut j = Journal::begin(&p, &t).unwrap();
    overwrite(&mut j, &t, 0, &bytes(100, 2));
    j.finish(&path).unwrap();
    assert!(p.place.list().unwrap().is_empty());
    let e = rollback(&t, &p.place).unwrap_err();
    assert_eq!(e.kind, crate::error::Kind::Journal);
}

#[test]
fn a_journal_others_can_write_is_never_used() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d");
    let before = bytes(10_000, 1);
    std::fs::write(&path, &before).unwrap();
    let t = open(&path);
    let p = plan(dir.path(), &t);
    let mut j = Journal::begin(&p, &t).unwrap();
    overwrite(&mut j, &t, 0, &bytes(100, 2));
    drop(j);
    let jp = p.place.list().unwrap().remove(0).path;
    std::fs::set_permissions(&jp, std::fs::Permissions::from_mode(0o666)).unwrap();
    let e = rollback(&t, &p.place).unwrap_err();
    assert_eq!(e.kind, crate::error::Kind::Journal);
    assert!(e.message.contains("not this user's own"), "{e}");
    assert!(
        std::fs::read(&path).unwrap() != before,
        "nothing was written back"
    );
}

#[test]
fn a_completed_runs_mark_makes_what_is_left_of_its_journals_stale() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d");
    std::fs::write(&path, bytes(10_000, 1)).unwrap();
    let t = open(&path);
    let p = plan(dir.path(), &t);
    let mut first = Journal::begin(&p, &t).unwrap();
    overwrite(&mut first, &t, 0, &bytes(100, 2));
    drop(first);
    let second = Journal::begin(&p, &t).unwrap();
    drop(second);
    // The second run completed and marked it, then died before removing the first.
    let newest = p.place.list().unwrap().pop().unwrap().path;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&newest)
        .unwrap();
    target::write_full_at(&f, &[super::format::COMPLETE], super::format::DONE_AT).unwrap();
    assert!(p.place.list().unwrap().is_empty(), "stale: never applied");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "and removed"
    );
}

#[test]
fn damage_inside_a_journal_is_refused_not_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d");
    let before = bytes(64 << 20, 3);
    std::fs::write(&path, &before).unwrap();
    let t = open(&path);
    let p = plan(dir.path(), &t);
    let mut j = Journal::begin(&p, &t).unwrap();
    // Three full groups, then damage in the first: more than a torn group follows it.
    for g in 0..3u64 {
        j.save(&t.file, g * (8 << 20), 8 << 20).unwrap();
        j.commit().unwrap();
    }
    drop(j);
    let jp = p.place.list().unwrap().remove(0).path;
    let f = std::fs::OpenOptions::new().write(true).open(&jp).unwrap();
    target::write_full_at(&f, &[0xff; 16], 4096 + 8192).unwrap();
    let e = rollback(&t, &p.place).unwrap_err();
    assert!(e.message.contains("damaged"), "{e}");
    assert_eq!(p.place.list().unwrap().len(), 1, "the journal is kept");
}

/// A version of a run that continued an unfinished one holds the bytes from before the
/// first (the oldest win), and restores them exactly; one made by a run that died before
/// its commit point (its journals still there) is stale and removed when found.
#[test]
fn a_version_holds_the_oldest_bytes_and_a_stale_one_goes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d");
    let before = bytes(20_000, 1);
    std::fs::write(&path, &before).unwrap();
    let t = open(&path);
    let mut p = plan(dir.path(), &t);
    p.keep = Some(2);
    let mut first = Journal::begin(&p, &t).unwrap();
    overwrite(&mut first, &t, 0, &bytes(100, 2));
    drop(first); // killed
    p.run_id = [10; 16];
    let mut second = Journal::begin(&p, &t).unwrap();
    overwrite(&mut second, &t, 50, &bytes(9000, 3));
    let made = second.finish(&path).unwrap().expect("a version");
    assert!(p.place.list().unwrap().is_empty());
    let versions = version::list(&p.place, None).unwrap();
    assert_eq!(versions.len(), 1);
    assert_eq!(versions[0].path, made);
    assert_eq!(versions[0].header.bytes, 9050);
    let out_path = dir.path().join("out");
    let out_file = std::fs::File::create(&out_path).unwrap();
    let out = restore::Out {
        file: &out_file,
        path: &out_path,
        device: None,
    };
    let t = open(&path);
    restore::restore(&t, &p.place, 1, &out, false).unwrap();
    assert!(std::fs::read(&out_path).unwrap() == before);

    // A third run makes its version, then dies before marking itself complete.
    p.run_id = [11; 16];
    let mut third = Journal::begin(&p, &t).unwrap();
    overwrite(&mut third, &t, 0, &bytes(10, 4));
    let live = p.place.list().unwrap();
    let made = version::Made {
        state_after: String::new(),
        size_after: 20_000,
        keep: 2,
        place: &p.place,
    };
    version::make(&live, &made).unwrap().expect("made");
    // A second stream making the same version at the same moment: the first wins.
    assert_eq!(version::make(&live, &made).unwrap(), None);
    assert_eq!(version::list(&p.place, None).unwrap().len(), 2);
    let from = live.first().map(|f| f.header.seq);
    assert_eq!(
        version::list(&p.place, from).unwrap().len(),
        1,
        "the stale one goes"
    );
}

/// A journal half made by a run killed while naming it (its temporary name) is removed
/// once its process is gone; one of a live process (another stream) is left alone.
#[test]
fn a_killed_runs_half_made_journal_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d");
    std::fs::write(&path, bytes(100, 1)).unwrap();
    let t = open(&path);
    let p = plan(dir.path(), &t);
    let dead = dir
        .path()
        .join(format!("{}00000001.0.tmp4000000000", p.place.prefix));
    let live = dir.path().join(format!(
        "{}00000001.1.tmp{}",
        p.place.prefix,
        std::process::id()
    ));
    std::fs::write(&dead, b"half").unwrap();
    std::fs::write(&live, b"half").unwrap();
    assert!(p.place.list().unwrap().is_empty());
    assert!(!dead.exists(), "the dead run's leftover stays");
    assert!(
        live.exists(),
        "a live stream's journal in the making was removed"
    );
}
