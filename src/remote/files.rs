//! What `apply` and `remove` do to `deployments_dir`: the only writes a
//! remote command makes. An `apply` is checked against the `[remote]`
//! limits and validated as `berth check-config` validates files before it
//! is written, so an invalid deployment never replaces a good one; it is
//! then written as `<id>.toml` atomically (temporary file, fsync, rename,
//! fsync of the directory), mode 0644 and owned by berth's user, which the
//! deployment-file safety rules accept. A `remove` deletes `<id>.toml` and
//! nothing else: the id is checked, so no path can be named.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::config::{self, RemoteSettings};
use crate::model::DeploymentSpec;

use super::Refusal;

/// The name a file gets while it is written: hidden and not `*.toml`, so
/// the watcher and `load_deployments_dir` skip it.
fn temp_name(id: &str) -> String {
    format!(".{id}.toml.remote-tmp")
}

/// Validates `text` as deployment `<id>.toml` and writes it. Returns the
/// deployment id.
pub fn apply(dir: &Path, remote: &RemoteSettings, text: &str) -> Result<String, Refusal> {
    let id = toml::from_str::<toml::Table>(text)
        .ok()
        .and_then(|t| t.get("id")?.as_str().map(str::to_string))
        .filter(|id| config::is_deployment_id(id));
    let path = dir.join(format!("{}.toml", id.as_deref().unwrap_or("remote-apply")));
    let spec = config::check_deployment_text(&path, text, dir).map_err(|errors| {
        Refusal::Invalid(super::clip(
            &errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
            super::MESSAGE_MAX,
        ))
    })?;
    check_limits(&spec, remote)?;
    write_atomically(dir, &spec.id, text)?;
    Ok(spec.id)
}

/// What a remote deployment may do (SPEC 10): mount only host paths at or
/// below one of `allowed_host_paths`, map devices only with `allow_devices`.
pub fn check_limits(spec: &DeploymentSpec, remote: &RemoteSettings) -> Result<(), Refusal> {
    let mut problems = Vec::new();
    for (component, exe) in spec.executables() {
        let name = format!("{}/{}", component.name, exe.name);
        for volume in &exe.volumes {
            let allowed = config::normalize_host_path(&volume.host).is_some_and(|host| {
                remote
                    .allowed_host_paths
                    .iter()
                    .any(|allowed| host.starts_with(allowed))
            });
            if !allowed {
                problems.push(format!(
                    "{name}: host path {} is outside allowed_host_paths ({})",
                    volume.host,
                    list(
                        remote
                            .allowed_host_paths
                            .iter()
                            .map(|p| p.display().to_string())
                    )
                ));
            }
        }
        if !exe.devices.is_empty() && !remote.allow_devices {
            problems.push(format!(
                "{name}: maps devices ({}) but allow_devices is false",
                exe.devices.join(", ")
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Refusal::Limits(super::clip(
            &format!("outside the [remote] limits: {}", problems.join("; ")),
            super::MESSAGE_MAX,
        )))
    }
}

fn list(items: impl Iterator<Item = String>) -> String {
    let items: Vec<String> = items.collect();
    if items.is_empty() {
        "none".to_string()
    } else {
        items.join(", ")
    }
}

fn write_atomically(dir: &Path, id: &str, text: &str) -> Result<(), Refusal> {
    let path = dir.join(format!("{id}.toml"));
    let tmp = dir.join(temp_name(id));
    let fail = |e: std::io::Error| Refusal::Write(format!("{}: {e}", path.display()));
    let write = || -> std::io::Result<()> {
        let _ = fs::remove_file(&tmp);
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)?;
        // The mode asked for is masked by the umask; say it once more.
        file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        fs::rename(&tmp, &path)?;
        fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        fail(e)
    })
}

/// Deletes `<dir>/<id>.toml`.
pub fn remove(dir: &Path, id: &str) -> Result<(), Refusal> {
    if !config::is_deployment_id(id) {
        return Err(Refusal::BadTarget(super::quote(id)));
    }
    let path = dir.join(format!("{id}.toml"));
    match fs::symlink_metadata(&path) {
        Ok(m) if m.is_file() || m.file_type().is_symlink() => {}
        Ok(_) => {
            return Err(Refusal::Write(format!(
                "{} is not a deployment file",
                path.display()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Refusal::NoFile {
                deployment: id.to_string(),
            })
        }
        Err(e) => return Err(Refusal::Write(format!("{}: {e}", path.display()))),
    }
    fs::remove_file(&path)
        .and_then(|()| fs::File::open(dir)?.sync_all())
        .map_err(|e| Refusal::Write(format!("{}: {e}", path.display())))
}

/// A `restart`, `stop` or `start` target: `deployment`, or
/// `deployment/component/executable`. Returns the deployment and, for one
/// executable, `component/executable`.
pub fn parse_target(payload: &str) -> Result<(String, Option<String>), Refusal> {
    let bad = || Refusal::BadTarget(super::quote(payload));
    let parts: Vec<&str> = payload.split('/').collect();
    match parts.as_slice() {
        [deployment] if config::is_deployment_id(deployment) => Ok((deployment.to_string(), None)),
        [deployment, component, executable]
            if config::is_deployment_id(deployment)
                && config::is_name(component, true)
                && config::is_name(executable, true) =>
        {
            Ok((
                deployment.to_string(),
                Some(format!("{component}/{executable}")),
            ))
        }
        _ => Err(bad()),
    }
}
