//! Watches `deployments_dir` with inotify and asks the supervisor to reload
//! when files in it change, debounced so that an editor's save or a copy of
//! several files becomes one reload. Its name in its parent is watched too,
//! and the mount table: a directory that appears later (created, or a disk
//! mounted there), or is replaced, is read and watched.

use std::ffi::OsString;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, InotifyEvent, WatchDescriptor};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::supervisor::Reloader;

/// Quiet time after the last change before the reload.
const DEBOUNCE: Duration = Duration::from_millis(300);

struct Fd(Inotify);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// What berth watches for a change of `deployments_dir`: the directory, and
/// its name in its parent. Through the parent a directory that is missing at
/// start, taken away, or replaced (a new directory moved into place,
/// `deployments_dir` itself a symlink pointed elsewhere) is watched again as
/// soon as it is there, and read. A mount makes no inotify event: a change
/// of the mount table re-arms both watches (a disk mounted on the directory
/// or on its parent), and is a change only if either now names another
/// directory.
struct Targets {
    dir: PathBuf,
    parent: PathBuf,
    name: OsString,
    dir_wd: Option<WatchDescriptor>,
    parent_wd: Option<WatchDescriptor>,
}

impl Targets {
    fn dir_flags() -> AddWatchFlags {
        AddWatchFlags::IN_CLOSE_WRITE
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_ATTRIB
            | AddWatchFlags::IN_DELETE_SELF
            | AddWatchFlags::IN_MOVE_SELF
    }

    fn parent_flags() -> AddWatchFlags {
        AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_ONLYDIR
    }

    /// Watches the directories that are at the two paths now, in place of
    /// those watched before; whether either is another one (a watch added
    /// again on the same directory keeps its descriptor).
    fn arm(&mut self, inotify: &Inotify) -> bool {
        let parent = inotify.add_watch(&self.parent, Self::parent_flags()).ok();
        let dir = inotify.add_watch(&self.dir, Self::dir_flags()).ok();
        let moved = parent != self.parent_wd || dir != self.dir_wd;
        for (old, new) in [(self.parent_wd, parent), (self.dir_wd, dir)] {
            if let Some(old) = old.filter(|old| Some(*old) != new) {
                // Fails harmlessly for a watch the kernel already removed.
                let _ = inotify.rm_watch(old);
            }
        }
        (self.parent_wd, self.dir_wd) = (parent, dir);
        moved
    }

    /// Whether these events change what berth would read; a directory that
    /// came, went or was replaced is watched anew.
    fn take(&mut self, inotify: &Inotify, events: Vec<InotifyEvent>) -> bool {
        let mut changed = false;
        let mut rearm = false;
        for event in events {
            if event.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                (changed, rearm) = (true, true);
            } else if Some(event.wd) == self.dir_wd {
                changed = true;
                rearm |= event.mask.intersects(
                    AddWatchFlags::IN_DELETE_SELF
                        | AddWatchFlags::IN_MOVE_SELF
                        | AddWatchFlags::IN_IGNORED,
                );
            } else if Some(event.wd) == self.parent_wd
                && event.name.as_deref() == Some(self.name.as_os_str())
            {
                (changed, rearm) = (true, true);
            }
        }
        if rearm {
            self.arm(inotify);
        }
        changed
    }
}

/// A watch set on `deployments_dir`, not yet read: set before berth first
/// reads the directory, so that a file written between that read and the
/// task that follows the watch is a change like any other, not missed.
pub struct Watch {
    fd: AsyncFd<Fd>,
    /// `/proc/self/mountinfo`, which polls as priority data when the mount
    /// table changes.
    mounts: Option<AsyncFd<File>>,
    targets: Targets,
}

impl Watch {
    /// Sets the watch; without inotify (or without the directory, its parent
    /// and the mount table) berth still reloads on SIGHUP, and says so.
    pub fn set(dir: &Path) -> Option<Watch> {
        let inotify = match Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC) {
            Ok(i) => i,
            Err(e) => {
                warn!(error = %e, "cannot watch deployments_dir; reload with SIGHUP");
                return None;
            }
        };
        let parent = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let mut targets = Targets {
            dir: dir.to_path_buf(),
            parent: parent.to_path_buf(),
            name: dir.file_name().map(ToOwned::to_owned).unwrap_or_default(),
            dir_wd: None,
            parent_wd: None,
        };
        targets.arm(&inotify);
        // Owned by its `AsyncFd`, as the inotify instance below.
        #[allow(deprecated)]
        let mounts = File::open("/proc/self/mountinfo")
            .and_then(|f| AsyncFd::with_interest(f, Interest::PRIORITY))
            .map_err(|e| debug!(error = %e, "the mount table cannot be followed"))
            .ok();
        match (targets.dir_wd, targets.parent_wd, &mounts) {
            (None, None, None) => {
                warn!(dir = %dir.display(), "cannot watch deployments_dir or its parent; reload with SIGHUP");
                return None;
            }
            (None, _, _) => {
                info!(dir = %dir.display(), "deployments_dir is missing; it is read when it appears");
            }
            (Some(_), None, _) => {
                warn!(dir = %dir.display(), "cannot watch the parent of deployments_dir: a directory put in its place is read on SIGHUP");
            }
            (Some(_), Some(_), _) => {}
        }
        // `AsyncFd` owns the inotify instance, so its descriptor stays open
        // for as long as it is registered: the I/O-safety concern of `new` (a
        // descriptor closed behind the reactor's back) cannot arise here, and
        // the safe constructor is kept rather than the `unsafe` `register`.
        #[allow(deprecated)]
        match AsyncFd::new(Fd(inotify)) {
            Ok(fd) => Some(Watch {
                fd,
                mounts,
                targets,
            }),
            Err(e) => {
                warn!(error = %e, "cannot watch deployments_dir; reload with SIGHUP");
                None
            }
        }
    }

    /// Follows the watch in a task: each change (debounced) asks the
    /// supervisor to reload, including changes made since [`Watch::set`].
    pub fn spawn(self, reloader: Reloader, shutdown: CancellationToken, tracker: &TaskTracker) {
        let Watch {
            fd,
            mounts,
            mut targets,
        } = self;
        tracker.spawn(async move {
            loop {
                // Wait for the first change.
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        changed = next(&fd, mounts.as_ref(), &mut targets) => match changed {
                            Some(true) => break,
                            Some(false) => {}
                            None => return,
                        }
                    }
                }
                // Then until it is quiet: only a change puts the reload off,
                // not what else happens beside the directory.
                let quiet = tokio::time::sleep(DEBOUNCE);
                tokio::pin!(quiet);
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = &mut quiet => break,
                        changed = next(&fd, mounts.as_ref(), &mut targets) => match changed {
                            Some(true) => quiet
                                .as_mut()
                                .reset(tokio::time::Instant::now() + DEBOUNCE),
                            Some(false) => {}
                            None => return,
                        }
                    }
                }
                debug!("deployments_dir changed; reloading");
                reloader.reload();
            }
        });
    }
}

/// Waits for the watch or the mount table and says whether what happened
/// changes what berth would read; `None` once the watch cannot be waited on.
/// The watch is read whole (readiness is cleared only once a read would
/// block).
async fn next(
    fd: &AsyncFd<Fd>,
    mounts: Option<&AsyncFd<File>>,
    targets: &mut Targets,
) -> Option<bool> {
    let mounted = async {
        match mounts {
            Some(m) => m.ready(Interest::PRIORITY).await.ok(),
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        guard = fd.readable() => {
            let mut guard = guard.ok()?;
            let mut changed = false;
            loop {
                let read = guard.try_io(|inner| {
                    inner
                        .get_ref()
                        .0
                        .read_events()
                        .map_err(std::io::Error::from)
                });
                match read {
                    Ok(Ok(events)) => changed |= targets.take(&guard.get_inner().0, events),
                    Ok(Err(e)) => {
                        debug!(error = %e, "reading the deployments_dir watch");
                        return Some(changed);
                    }
                    Err(_would_block) => return Some(changed),
                }
            }
        }
        Some(mut guard) = mounted => {
            // Polling the file took the change; the readiness goes with it.
            guard.clear_ready();
            Some(targets.arm(&fd.get_ref().0))
        }
    }
}
