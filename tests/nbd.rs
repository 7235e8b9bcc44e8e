//! The NBD client against real servers: qemu-nbd serving qcow2 images (made and
//! inspected with qemu-img and qemu-io), and nbdkit's memory plugin over a unix socket
//! and over TCP. A missing tool fails its test with the package to install.

use blocksync::error::Kind;
use blocksync::testing::{
    Client, Context, Extent, Options, QemuNbd, QemuOptions, Uri, qemu_nbd_in,
};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// Runs a tool that must be installed and succeed.
fn tool(name: &str, package: &str, args: &[&str]) -> String {
    let out = Command::new(name)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{name} not found ({e}): install {package}"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{name} {args:?}: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

fn qemu_img(args: &[&str]) -> String {
    tool("qemu-img", "qemu-utils", args)
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A qcow2 image of `size` (qemu-img's size syntax) in `dir`.
fn qcow2(dir: &Path, size: &str) -> PathBuf {
    let img = dir.join("disk.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), size]);
    img
}

fn serve(img: &Path, change: impl FnOnce(&mut QemuOptions)) -> QemuNbd {
    let mut o = QemuOptions::new(img, "qcow2", Kind::Source);
    change(&mut o);
    QemuNbd::start(&o).unwrap_or_else(|e| panic!("qemu-nbd: {e}"))
}

fn connect(uri: &Uri, contexts: Vec<Context>) -> Client {
    let o = Options {
        contexts,
        ..Options::default()
    };
    Client::connect(uri, o).unwrap_or_else(|e| panic!("connect {uri}: {e}"))
}

/// Deterministic bytes, different per seed.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}

fn read(c: &mut Client, offset: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0xeeu8; len as usize];
    c.read_at(offset, &mut buf).unwrap();
    buf
}

#[test]
fn qcow2_round_trip_survives_a_restart_and_matches_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let img = qcow2(dir.path(), "64M");
    let big = pattern(40 * MIB as usize, 1); // more than one request's payload
    let small = pattern(4096, 2);
    {
        let q = serve(&img, |_| {});
        let mut c = connect(&q.uri(), vec![]);
        assert_eq!(c.size(), 64 * MIB);
        let f = c.flags();
        assert!(
            !f.read_only && f.can_flush && f.can_trim && f.can_write_zeroes,
            "{f:?}"
        );
        let b = c.block_sizes();
        assert!(
            b.min <= b.preferred && b.preferred as u64 <= 32 * MIB,
            "{b:?}"
        );
        c.write_at(8 * MIB, &big).unwrap();
        c.write_at(60 * MIB, &small).unwrap();
        c.flush().unwrap();
        assert_eq!(read(&mut c, 8 * MIB, big.len() as u64), big);
        assert_eq!(read(&mut c, 60 * MIB, 4096), small);
        c.close().unwrap();
    }
    // A new server on the same image: the data was written to the image, not a cache.
    let q = serve(&img, |o| o.read_only = true);
    let mut c = connect(&q.uri(), vec![]);
    assert!(c.flags().read_only);
    assert_eq!(read(&mut c, 60 * MIB, 4096), small);
    let e = c.write_at(0, &small).unwrap_err();
    assert!(e.message.contains("read-only"), "{e}");
    drop(c);
    drop(q);

    let raw = dir.path().join("disk.raw");
    qemu_img(&["convert", "-f", "qcow2", "-O", "raw", s(&img), s(&raw)]);
    let bytes = std::fs::read(&raw).unwrap();
    assert_eq!(&bytes[8 << 20..48 << 20], &big[..]);
    assert_eq!(&bytes[60 << 20..(60 << 20) + 4096], &small[..]);
    assert!(bytes[..8 << 20].iter().all(|&b| b == 0));
}

#[test]
fn a_mostly_empty_qcow2_reports_its_holes() {
    let dir = tempfile::tempdir().unwrap();
    let img = qcow2(dir.path(), "1G");
    let q = serve(&img, |o| o.direct = true);
    let mut c = connect(&q.uri(), vec![Context::Allocation]);
    c.write_at(512 * MIB, &pattern(MIB as usize, 3)).unwrap();
    c.flush().unwrap();
    let extents = c.block_status(0, c.size(), &Context::Allocation).unwrap();
    let mut at = 0;
    for e in &extents {
        assert_eq!(e.offset, at, "{extents:?}");
        at = e.offset + e.length;
    }
    assert_eq!(at, 1 << 30, "the extents cover the disk");
    let data: u64 = extents
        .iter()
        .filter(|e| !e.is_hole())
        .map(|e| e.length)
        .sum();
    assert_eq!(data, MIB, "only the written MiB is allocated: {extents:?}");
    let written = extents.iter().find(|e| !e.is_hole()).unwrap();
    assert_eq!((written.offset, written.is_zero()), (512 * MIB, false));
    assert!(extents.iter().filter(|e| e.is_hole()).all(Extent::is_zero));
    // A range inside a hole is one extent, clipped to the range.
    let inner = c.block_status(4096, 8192, &Context::Allocation).unwrap();
    assert_eq!(inner.len(), 1);
    assert_eq!((inner[0].offset, inner[0].length), (4096, 8192));
    c.close().unwrap();
}

#[test]
fn a_dirty_bitmap_marks_only_what_was_written() {
    let dir = tempfile::tempdir().unwrap();
    let img = qcow2(dir.path(), "64M");
    qemu_img(&["bitmap", "--add", s(&img), "b0"]);
    tool(
        "qemu-io",
        "qemu-utils",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0xab 1M 64k",
            "-c",
            "write -P 0xcd 10M 128k",
            s(&img),
        ],
    );
    assert_eq!(
        dirty_extents(&img, "b0"),
        vec![(MIB, 64 << 10), (10 * MIB, 128 << 10)]
    );
    let q = serve(&img, |o| {
        o.read_only = true;
        o.bitmap = Some("b0".into());
    });
    let mut c = connect(&q.uri(), vec![Context::Allocation]);
    assert!(read(&mut c, MIB, 64 << 10).iter().all(|&b| b == 0xab));
    assert!(read(&mut c, 10 * MIB, 4096).iter().all(|&b| b == 0xcd));
    c.close().unwrap();

    let missing = Context::DirtyBitmap("nope".into());
    let o = Options {
        contexts: vec![missing],
        ..Options::default()
    };
    let e = Client::connect(&q.uri(), o).err().expect("no bitmap nope");
    assert_eq!(e.kind, Kind::Source);
    assert!(e.message.contains("no dirty bitmap \"nope\""), "{e}");
}

/// The dirty extents of bitmap `name` of `img`, through a read-only qemu-nbd.
fn dirty_extents(img: &Path, name: &str) -> Vec<(u64, u64)> {
    let q = serve(img, |o| {
        o.read_only = true;
        o.bitmap = Some(name.into());
    });
    let bitmap = Context::DirtyBitmap(name.into());
    let mut c = connect(&q.uri(), vec![bitmap.clone()]);
    let dirty = c
        .block_status(0, c.size(), &bitmap)
        .unwrap()
        .iter()
        .filter(|e| e.is_dirty())
        .map(|e| (e.offset, e.length))
        .collect();
    c.close().unwrap();
    dirty
}

#[test]
fn writes_through_qemu_nbd_reach_the_bitmap_and_leave_it_usable() {
    let dir = tempfile::tempdir().unwrap();
    let img = qcow2(dir.path(), "16M");
    qemu_img(&["bitmap", "--add", s(&img), "b0"]);
    let q = serve(&img, |_| {});
    let mut c = connect(&q.uri(), vec![]);
    c.write_at(2 * MIB, &pattern(64 << 10, 8)).unwrap();
    c.flush().unwrap();
    c.close().unwrap();
    drop(q);
    // Stopped cleanly, qemu-nbd stored the bitmap: a killed one leaves it "in-use".
    let info = qemu_img(&["info", "--output=json", s(&img)]);
    assert!(
        info.contains("\"b0\"") && !info.contains("in-use"),
        "{info}"
    );
    assert_eq!(dirty_extents(&img, "b0"), vec![(2 * MIB, 64 << 10)]);
}

/// Writes a pattern over 4 MiB, then zeroes the first MiB keeping it allocated, the
/// second punching it, and trims the third: all three read as zeroes after.
fn zeroes_and_trim_take_effect(c: &mut Client) {
    let data = pattern(4 * MIB as usize, 4);
    c.write_at(0, &data).unwrap();
    c.write_zeroes(0, MIB, false).unwrap();
    c.write_zeroes(MIB, MIB, true).unwrap();
    c.trim(2 * MIB, MIB).unwrap();
    c.flush().unwrap();
    let back = read(c, 0, 4 * MIB);
    assert!(
        back[..3 << 20].iter().all(|&b| b == 0),
        "zeroed and trimmed"
    );
    assert_eq!(&back[3 << 20..], &data[3 << 20..]);
}

#[test]
fn write_zeroes_and_trim_read_back_as_zeroes() {
    let dir = tempfile::tempdir().unwrap();
    let img = qcow2(dir.path(), "16M");
    let q = serve(&img, |_| {});
    let mut c = connect(&q.uri(), vec![Context::Allocation]);
    zeroes_and_trim_take_effect(&mut c);
    let ext = c.block_status(0, 4 * MIB, &Context::Allocation).unwrap();
    let zero: u64 = ext.iter().filter(|e| e.is_zero()).map(|e| e.length).sum();
    assert!(
        zero >= 2 * MIB,
        "zeroed ranges are reported as zero: {ext:?}"
    );
    c.close().unwrap();
}

#[test]
fn clear_errors_for_a_missing_export_image_or_qemu_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let img = qcow2(dir.path(), "1M");
    let q = serve(&img, |_| {});
    let uri = Uri::unix(q.socket(), "nope");
    let o = Options {
        role: Kind::Destination,
        ..Options::default()
    };
    let e = Client::connect(&uri, o).err().expect("no export nope");
    assert_eq!(e.kind, Kind::Destination);
    assert!(
        e.message.contains("'nope'") && e.message.contains("no such export"),
        "{e}"
    );

    let gone = Uri::unix(dir.path().join("no.sock"), "");
    let e = Client::connect(&gone, Options::default()).err().unwrap();
    assert!(
        e.message.starts_with("cannot connect to NBD export ''"),
        "{e}"
    );

    let o = QemuOptions::new(dir.path().join("absent.qcow2"), "qcow2", Kind::Source);
    let e = QemuNbd::start(&o).err().expect("no image");
    assert_eq!(e.kind, Kind::Source);
    assert!(e.message.contains("qemu-nbd could not serve"), "{e}");
    assert!(e.message.contains("absent.qcow2"), "{e}");

    let e = qemu_nbd_in(dir.path().as_os_str()).unwrap_err();
    assert_eq!(e.message, "qemu-nbd not found: install qemu-utils");
    assert!(
        qemu_nbd_in("/nowhere:/usr/bin".as_ref()).is_ok(),
        "qemu-nbd is installed"
    );
}

#[test]
fn qemu_nbd_lives_in_a_private_directory_removed_on_drop() {
    let dir = tempfile::tempdir().unwrap();
    let img = qcow2(dir.path(), "1M");
    let q = serve(&img, |_| {});
    let private = q.socket().parent().unwrap().to_path_buf();
    let mode = std::fs::metadata(&private).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    drop(q);
    assert!(!private.exists(), "{} removed", private.display());
}

/// Submits 64 reads of 64 KiB before collecting any, then collects them in reverse.
fn many_in_flight(c: &mut Client, seed: u8) {
    let chunk = 64 << 10;
    let data = pattern(64 * chunk, seed);
    c.write_at(0, &data).unwrap();
    let mut handles = Vec::new();
    for i in 0..64 {
        assert!(c.has_room(chunk));
        handles.push((i, c.submit_read((i * chunk) as u64, chunk as u32).unwrap()));
    }
    assert!(!c.has_room(chunk), "the window holds 64 requests");
    assert!(c.submit_read(0, 512).is_err());
    while let Some((i, h)) = handles.pop() {
        let got = c.wait(h).unwrap();
        assert!(got == data[i * chunk..(i + 1) * chunk], "read {i}");
    }
    let w: Vec<_> = (0..8u64)
        .map(|i| c.submit_write(i * 4096, &[i as u8; 4096]).unwrap())
        .collect();
    for h in w {
        assert!(c.wait(h).unwrap().is_empty());
    }
    assert_eq!(read(c, 7 * 4096, 4096), vec![7u8; 4096]);
}

#[test]
fn sixty_four_reads_in_flight_complete_by_handle() {
    let dir = tempfile::tempdir().unwrap();
    let img = qcow2(dir.path(), "8M");
    let q = serve(&img, |_| {});
    let mut c = connect(&q.uri(), vec![]);
    many_in_flight(&mut c, 5);
    c.close().unwrap();
}

/// nbdkit serving its memory plugin; killed on drop.
struct Nbdkit {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Nbdkit {
    /// `listen`: `-U SOCKET` or `-i 127.0.0.1 -p PORT`; `ready` tells when it accepts.
    fn start(listen: &[&str], dir: tempfile::TempDir, ready: impl Fn() -> bool) -> Nbdkit {
        // Its stderr goes to a file: the readiness probes make it log noise.
        let log = dir.path().join("nbdkit.log");
        let child = Command::new("nbdkit")
            .args(["-f", "--exit-with-parent"])
            .args(listen)
            .args(["memory", "64M"])
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("nbdkit not found ({e}): install nbdkit"));
        let mut kit = Nbdkit { child, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready() {
            if let Ok(Some(st)) = kit.child.try_wait() {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                panic!("nbdkit exited ({st}): {text}");
            }
            assert!(Instant::now() < deadline, "nbdkit did not listen in 30 s");
            std::thread::sleep(Duration::from_millis(10));
        }
        kit
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn nbdkit_memory_over_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("kit.sock");
    let probe = sock.clone();
    let _kit = Nbdkit::start(&["-U", s(&sock)], dir, || {
        UnixStream::connect(&probe).is_ok()
    });
    let uri = Uri::parse(&format!("nbd+unix:///?socket={}", s(&sock))).unwrap();
    let mut c = connect(&uri, vec![Context::Allocation]);
    assert_eq!(c.size(), 64 * MIB);
    let before = c.block_status(0, c.size(), &Context::Allocation).unwrap();
    assert!(
        before.iter().all(Extent::is_hole),
        "empty memory is a hole: {before:?}"
    );
    zeroes_and_trim_take_effect(&mut c);
    let after = c.block_status(0, 8 * MIB, &Context::Allocation).unwrap();
    let data: Vec<(u64, u64)> = after
        .iter()
        .filter(|e| !e.is_hole())
        .map(|e| (e.offset, e.length))
        .collect();
    assert!(data.contains(&(3 * MIB, MIB)), "{after:?}");
    many_in_flight(&mut c, 6);
    c.close().unwrap();
}

#[test]
fn nbdkit_memory_over_tcp() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let p = port.to_string();
    let probe = addr.clone();
    let dir = tempfile::tempdir().unwrap();
    let _kit = Nbdkit::start(&["-i", "127.0.0.1", "-p", &p], dir, || {
        std::net::TcpStream::connect(&probe).is_ok()
    });
    let uri = Uri::parse(&format!("nbd://{addr}")).unwrap();
    let mut c = connect(&uri, vec![]);
    let data = pattern(3 * MIB as usize + 512, 7);
    c.write_at(MIB, &data).unwrap();
    c.flush().unwrap();
    assert_eq!(read(&mut c, MIB, data.len() as u64), data);
    c.close().unwrap();
}
