//! Watches `deployments_dir` with inotify and asks the supervisor to reload
//! when files in it change, debounced so that an editor's save or a copy of
//! several files becomes one reload.

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::Path;
use std::time::Duration;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::unix::AsyncFd;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::supervisor::Reloader;

/// Quiet time after the last change before the reload.
const DEBOUNCE: Duration = Duration::from_millis(300);

struct Fd(Inotify);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// A watch set on `deployments_dir`, not yet read: set before berth first
/// reads the directory, so that a file written between that read and the
/// task that follows the watch is a change like any other, not missed.
pub struct Watch {
    fd: AsyncFd<Fd>,
}

impl Watch {
    /// Sets the watch; without inotify (or without the directory) berth
    /// still reloads on SIGHUP, and says so.
    pub fn set(dir: &Path) -> Option<Watch> {
        let inotify = match Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC) {
            Ok(i) => i,
            Err(e) => {
                warn!(error = %e, "cannot watch deployments_dir; reload with SIGHUP");
                return None;
            }
        };
        let flags = AddWatchFlags::IN_CLOSE_WRITE
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_ATTRIB;
        if let Err(e) = inotify.add_watch(dir, flags) {
            warn!(dir = %dir.display(), error = %e, "cannot watch deployments_dir; reload with SIGHUP");
            return None;
        }
        // `AsyncFd` owns the inotify instance, so its descriptor stays open
        // for as long as it is registered: the I/O-safety concern of `new` (a
        // descriptor closed behind the reactor's back) cannot arise here, and
        // the safe constructor is kept rather than the `unsafe` `register`.
        #[allow(deprecated)]
        match AsyncFd::new(Fd(inotify)) {
            Ok(fd) => Some(Watch { fd }),
            Err(e) => {
                warn!(error = %e, "cannot watch deployments_dir; reload with SIGHUP");
                None
            }
        }
    }

    /// Follows the watch in a task: each change (debounced) asks the
    /// supervisor to reload, including changes made since [`Watch::set`].
    pub fn spawn(self, reloader: Reloader, shutdown: CancellationToken, tracker: &TaskTracker) {
        let fd = self.fd;
        tracker.spawn(async move {
            loop {
                // Wait for the first change.
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    ready = fd.readable() => match ready {
                        Ok(mut guard) => {
                            let _ = guard.get_inner().0.read_events();
                            guard.clear_ready();
                        }
                        Err(_) => return,
                    }
                }
                // Then until it is quiet.
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(DEBOUNCE) => break,
                        ready = fd.readable() => if let Ok(mut guard) = ready {
                            let _ = guard.get_inner().0.read_events();
                            guard.clear_ready();
                        }
                    }
                }
                debug!("deployments_dir changed; reloading");
                reloader.reload();
            }
        });
    }
}
