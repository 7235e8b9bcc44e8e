//! The watchdog process that unmounts a [`super::FaultyFs`] whose test process died.

use super::FILE_NAME;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// Cleans up after a test process killed outright (SIGKILL, Ctrl-C), where Drop never
/// runs. Worse than a stale mount: if the process was reading its own file, that reader
/// waits uninterruptibly for an answer the dead server threads will never send, and as
/// the reader keeps the process's /dev/fuse fd open, nothing ever aborts the connection;
/// the process stays a zombie. Even closing its files at exit can hang the same way, on
/// the FLUSH of the faulty file. So a watcher outside it (its own process group, so
/// Ctrl-C spares it) waits for "done" from Drop, or for the process to end or start
/// exiting, and then detaches loop devices over the file and force-unmounts, which
/// aborts the connection.
pub(super) fn watchdog(dir: &Path) -> Child {
    const SCRIPT: &str = r#"
        trap '' INT TERM HUP QUIT
        while :; do
            read -r -t 0.2 line; rc=$?
            [ $rc -eq 0 ] && [ "$line" = done ] && exit 0
            [ $rc -gt 128 ] || break # end of input without "done": the test died
            read -r st < "/proc/$1/stat" || break
            st=(${st##*) })
            # Dead, or dying (PF_EXITING) and maybe stuck closing its files.
            [ "${st[0]}" = Z ] && break
            (( st[6] & 4 )) && break
        done
        # Loop devices over the file would outlive it, failing every read.
        loops=()
        for f in /sys/block/loop*/loop/backing_file; do
            read -r b < "$f" && [ "$b" = "$3" ] || continue
            d=${f#/sys/block/}
            loops+=("/dev/${d%%/*}")
        done 2>/dev/null
        umount -f -l "$2"
        for d in "${loops[@]}"; do losetup -d "$d"; done
        rmdir "$2"
    "#;
    Command::new("bash")
        .args(["-c", SCRIPT, "faultyfs-watchdog"])
        .arg(std::process::id().to_string())
        .arg(dir)
        .arg(dir.join(FILE_NAME))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("start the faultyfs watchdog")
}
