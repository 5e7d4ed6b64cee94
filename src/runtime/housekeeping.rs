//! Image housekeeping as pure decisions (SPEC 8): when the engine's data
//! root needs a collection, and which images one removes. The caller lists
//! the images and the data root (`ContainerRuntime::list_images`,
//! `data_root_usage`), says which images it may remove at all, removes the
//! planned ones (`remove_image`, never forced) and reads the data root again:
//! image sizes overlap (shared layers), so a plan is an estimate and the
//! second reading is the truth. Nothing here talks to the engine.

use crate::config::ImageSettings;

use super::{DiskUsage, ImageInfo};

/// Why a collection is due, if it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The data root is fuller than `gc_high_percent`.
    High,
    /// A pull is about to start with less than `min_free_mb` free.
    BeforePull,
}

/// Whether a collection is due now; `pulling` when a pull is about to start.
pub fn collection_due(
    usage: &DiskUsage,
    settings: &ImageSettings,
    pulling: bool,
) -> Option<Trigger> {
    if pulling && usage.free_bytes < settings.min_free_bytes {
        return Some(Trigger::BeforePull);
    }
    (usage.used_percent() > settings.gc_high_percent).then_some(Trigger::High)
}

/// Whether a pull may start: `min_free_mb` free (checked after a collection;
/// still short is `DEP_E305`).
pub fn pull_fits(usage: &DiskUsage, settings: &ImageSettings) -> bool {
    usage.free_bytes >= settings.min_free_bytes
}

/// The images a collection removes, in order: only those `removable` allows
/// (berth pulled them, and no current deployment or kept previous version
/// names them) and no container uses, oldest first, until the data root
/// would be at `gc_low_percent` and have `min_free_mb` free.
pub fn plan_collection<'a>(
    images: &'a [ImageInfo],
    usage: &DiskUsage,
    settings: &ImageSettings,
    removable: impl Fn(&ImageInfo) -> bool,
) -> Vec<&'a ImageInfo> {
    let mut candidates: Vec<&ImageInfo> = images
        .iter()
        .filter(|i| i.containers.is_empty() && removable(i))
        .collect();
    candidates.sort_by(|a, b| a.created.cmp(&b.created).then(a.id.cmp(&b.id)));
    let low_used = usage.total_bytes / 100 * u64::from(settings.gc_low_percent);
    let mut used = usage.total_bytes.saturating_sub(usage.free_bytes);
    let mut plan = Vec::new();
    for image in candidates {
        let free = usage.total_bytes.saturating_sub(used);
        if used <= low_used && free >= settings.min_free_bytes {
            break;
        }
        used = used.saturating_sub(image.size_bytes);
        plan.push(image);
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    const GB: u64 = 1 << 30;

    fn settings() -> ImageSettings {
        ImageSettings {
            min_free_bytes: GB,
            gc_high_percent: 85,
            gc_low_percent: 70,
        }
    }

    fn usage(total: u64, free: u64) -> DiskUsage {
        DiskUsage {
            data_root: "/var/lib/docker".into(),
            total_bytes: total,
            free_bytes: free,
        }
    }

    fn image(id: &str, created: i64, size: u64, used: bool) -> ImageInfo {
        ImageInfo {
            id: id.into(),
            tags: vec![format!("{id}:1")],
            size_bytes: size,
            created,
            containers: if used { vec!["c1".into()] } else { Vec::new() },
        }
    }

    #[test]
    fn a_collection_is_due_above_high_or_short_before_a_pull() {
        let s = settings();
        assert_eq!(
            collection_due(&usage(100 * GB, 14 * GB), &s, false),
            Some(Trigger::High)
        );
        assert_eq!(
            collection_due(&usage(100 * GB, 15 * GB), &s, false),
            None,
            "85% is not above"
        );
        assert_eq!(collection_due(&usage(100 * GB, 50 * GB), &s, true), None);
        let tight = usage(4 * GB, GB / 2);
        assert_eq!(collection_due(&tight, &s, true), Some(Trigger::BeforePull));
        assert!(!pull_fits(&tight, &s));
        assert!(pull_fits(&usage(4 * GB, GB), &s));
    }

    #[test]
    fn removes_unused_removable_images_oldest_first_down_to_low() {
        let images = [
            image("newest", 30, 5 * GB, false),
            image("in-use", 1, 50 * GB, true),
            image("oldest", 10, 5 * GB, false),
            image("not-ours", 5, 50 * GB, false),
            image("middle", 20, 5 * GB, false),
        ];
        // 80 of 100 GB used: down to 70 takes two 5 GB images.
        let plan = plan_collection(&images, &usage(100 * GB, 20 * GB), &settings(), |i| {
            i.id != "not-ours"
        });
        let ids: Vec<&str> = plan.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, ["oldest", "middle"]);

        // Far above: everything it may remove, and no more.
        let plan = plan_collection(&images, &usage(100 * GB, 2 * GB), &settings(), |i| {
            i.id != "not-ours"
        });
        let ids: Vec<&str> = plan.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, ["oldest", "middle", "newest"]);

        // Already low and enough free: nothing.
        assert!(
            plan_collection(&images, &usage(100 * GB, 40 * GB), &settings(), |_| true).is_empty()
        );
    }

    #[test]
    fn a_small_disk_collects_until_min_free() {
        // 2 GB at 60% is under low, but 0.8 GB free is short of 1 GB: the
        // oldest image (0.25 GB) makes room.
        let images = [image("a", 1, GB / 4, false), image("b", 2, GB / 2, false)];
        let disk = usage(2 * GB, GB * 8 / 10);
        assert_eq!(
            collection_due(&disk, &settings(), true),
            Some(Trigger::BeforePull)
        );
        let plan = plan_collection(&images, &disk, &settings(), |_| true);
        let ids: Vec<&str> = plan.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, ["a"]);
    }
}
