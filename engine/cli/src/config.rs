//! The optional TOML config file (`--config FILE`) of the daemons and operator commands.
//!
//! A setting in the file is exactly a command-line flag: the key is the flag's long name
//! (`ring-mib`, or `ring_mib`), the value its argument. Keys at the top level apply to every
//! command that has such a flag (the settings one replication group shares: `psk-file`,
//! `ring-mib`, ...); a `[primary]`, `[dr]`, `[aux]`, `[failover]` or `[status]` section holds the
//! settings of that command and wins over the top level. A flag given on the command line wins
//! over both. A boolean switch (`no-auto-failover = true`) is given by `true` and left out by
//! `false`.
//!
//! The file is turned into flags inserted before the user's own, so clap validates every value
//! exactly as it does on the command line and `--help` stays the one reference. An unknown key
//! or section is an error naming it, so a typo cannot silently leave a default in place.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::Path;

/// Commands that read a config file.
pub const CONFIGURABLE: [&str; 5] = ["primary", "dr", "aux", "failover", "status"];

/// Files bigger than this are not config files.
const CONFIG_BYTES_MAX: u64 = 1 << 20;

/// Whether the flag `--name` (or `--name=...`) is among `args`.
fn given(args: &[OsString], name: &str) -> bool {
    let flag = format!("--{name}");
    args.iter().any(|arg| {
        let arg = arg.to_string_lossy();
        arg == flag || arg.starts_with(&format!("{flag}="))
    })
}

/// The value of `--config` among `args`, if any.
fn config_path(args: &[OsString]) -> Result<Option<OsString>, String> {
    for (index, arg) in args.iter().enumerate() {
        let text = arg.to_string_lossy();
        if text == "--config" {
            return match args.get(index + 1) {
                Some(path) => Ok(Some(path.clone())),
                None => Err("--config needs a file".into()),
            };
        }
        if let Some(path) = text.strip_prefix("--config=") {
            return Ok(Some(path.into()));
        }
    }
    Ok(None)
}

/// The long flags of one command: name -> whether it takes a value.
fn flags_of(command: &clap::Command) -> BTreeMap<String, bool> {
    command
        .get_arguments()
        .filter_map(|arg| {
            let long = arg.get_long()?;
            Some((long.to_string(), arg.get_action().takes_values()))
        })
        .collect()
}

/// The flags one setting stands for, or why it cannot be one.
fn setting_to_flags(
    key: &str,
    value: &toml::Value,
    takes_value: bool,
    out: &mut Vec<OsString>,
) -> Result<(), String> {
    let flag = format!("--{key}");
    let text = match value {
        toml::Value::String(text) => text.clone(),
        toml::Value::Integer(number) => number.to_string(),
        toml::Value::Float(number) => number.to_string(),
        toml::Value::Boolean(switch) if !takes_value => {
            if *switch {
                out.push(flag.into());
            }
            return Ok(());
        }
        toml::Value::Boolean(switch) => switch.to_string(),
        _ => return Err(format!("`{key}` must be a string, a number or a boolean")),
    };
    if !takes_value {
        return Err(format!("`{key}` is a switch: give it as true or false"));
    }
    out.push(flag.into());
    out.push(text.into());
    Ok(())
}

/// Reads and checks a config file, and returns the flags it gives `command` (except those in
/// `given_flags`).
fn flags_from_file(
    path: &Path,
    cli: &clap::Command,
    command: &str,
    user_args: &[OsString],
) -> Result<Vec<OsString>, String> {
    let fail = |why: String| format!("config file {}: {why}", path.display());
    let size = std::fs::metadata(path)
        .map_err(|error| fail(error.to_string()))?
        .len();
    if size > CONFIG_BYTES_MAX {
        return Err(fail(format!(
            "{size} bytes; a config file is at most {CONFIG_BYTES_MAX}"
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|error| fail(error.to_string()))?;
    let table: toml::Table = text
        .parse()
        .map_err(|error: toml::de::Error| fail(error.message().to_string()))?;
    let flags_by_command: BTreeMap<&str, BTreeMap<String, bool>> = CONFIGURABLE
        .iter()
        .map(|&name| {
            let sub = cli
                .find_subcommand(name)
                .expect("every configurable command exists");
            (name, flags_of(sub))
        })
        .collect();
    let normalise = |key: &str| key.replace('_', "-");
    // Settings for `command`: the top level first, its own section over it.
    let mut settings: BTreeMap<String, &toml::Value> = BTreeMap::new();
    for (key, value) in &table {
        if let toml::Value::Table(section) = value {
            let Some(known) = flags_by_command.get(key.as_str()) else {
                return Err(fail(format!(
                    "unknown section [{key}]; sections are {}",
                    CONFIGURABLE.join(", ")
                )));
            };
            for (inner, _) in section {
                let name = normalise(inner);
                if name == "config" || !known.contains_key(&name) {
                    return Err(fail(format!("[{key}] has no setting `{inner}`")));
                }
            }
            continue;
        }
        let name = normalise(key);
        if name == "config"
            || !flags_by_command
                .values()
                .any(|known| known.contains_key(&name))
        {
            return Err(fail(format!("unknown setting `{key}`")));
        }
        if flags_by_command[command].contains_key(&name) {
            settings.insert(name, value);
        }
    }
    if let Some(toml::Value::Table(section)) = table.get(command) {
        for (key, value) in section {
            settings.insert(normalise(key), value);
        }
    }
    let mut flags = Vec::new();
    for (name, value) in settings {
        if given(user_args, &name) {
            continue;
        }
        let takes_value = flags_by_command[command][&name];
        setting_to_flags(&name, value, takes_value, &mut flags).map_err(fail)?;
    }
    Ok(flags)
}

/// The command line with the settings of `--config FILE` inserted after the command's name, so
/// that the user's own flags come later and win.
pub fn expand(args: Vec<OsString>, cli: &clap::Command) -> Result<Vec<OsString>, String> {
    let Some(command) = args.get(1).map(|arg| arg.to_string_lossy().into_owned()) else {
        return Ok(args);
    };
    if !CONFIGURABLE.contains(&command.as_str()) {
        return Ok(args);
    }
    let user_args = &args[2..];
    let Some(path) = config_path(user_args)? else {
        return Ok(args);
    };
    let flags = flags_from_file(Path::new(&path), cli, &command, user_args)?;
    let mut expanded = args[..2].to_vec();
    expanded.extend(flags);
    expanded.extend_from_slice(user_args);
    Ok(expanded)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A command with the shapes of flag a daemon has: valued, switch, and another command.
    fn cli() -> clap::Command {
        let daemon = |name: &'static str| {
            clap::Command::new(name)
                .arg(clap::Arg::new("config").long("config"))
                .arg(clap::Arg::new("psk-file").long("psk-file"))
                .arg(clap::Arg::new("ring-mib").long("ring-mib"))
        };
        clap::Command::new("ordinal")
            .subcommand(daemon("primary").arg(clap::Arg::new("mode").long("mode")))
            .subcommand(
                daemon("dr").arg(
                    clap::Arg::new("no-auto-failover")
                        .long("no-auto-failover")
                        .action(clap::ArgAction::SetTrue),
                ),
            )
            .subcommand(daemon("aux"))
            .subcommand(daemon("failover"))
            .subcommand(daemon("status"))
            .subcommand(clap::Command::new("sim"))
    }

    fn expand_with(config: &str, args: &[&str]) -> Result<Vec<String>, String> {
        let dir = std::env::temp_dir().join(format!("ordinal-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join(format!("{:x}.toml", crate::config::tests::hash(config)));
        std::fs::write(&path, config).expect("write config");
        let mut full: Vec<OsString> = vec!["ordinal".into()];
        full.extend(args.iter().map(OsString::from));
        full.push("--config".into());
        full.push(path.clone().into());
        let expanded = expand(full, &cli());
        let _ = std::fs::remove_file(&path);
        let expanded = expanded?;
        // Drop the program name, the command and the trailing --config FILE for readability.
        let strings: Vec<String> = expanded
            .iter()
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect();
        Ok(strings[2..strings.len() - 2].to_vec())
    }

    fn hash(text: &str) -> u64 {
        text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        })
    }

    /// Top-level settings apply where the command has the flag; a section wins over the top
    /// level and the command line wins over both; switches are given by `true`.
    #[test]
    fn settings_become_flags_in_order_of_precedence() {
        let config = "psk-file = '/etc/psk'\nring_mib = 64\n[primary]\nring-mib = 128\nmode = 'async'\n[dr]\nno-auto-failover = true\n";
        assert_eq!(
            expand_with(config, &["primary"]).unwrap(),
            [
                "--mode",
                "async",
                "--psk-file",
                "/etc/psk",
                "--ring-mib",
                "128"
            ]
        );
        assert_eq!(
            expand_with(config, &["primary", "--ring-mib", "32"]).unwrap(),
            [
                "--mode",
                "async",
                "--psk-file",
                "/etc/psk",
                "--ring-mib",
                "32"
            ]
        );
        assert_eq!(
            expand_with(config, &["dr", "--ring-mib=16"]).unwrap(),
            [
                "--no-auto-failover",
                "--psk-file",
                "/etc/psk",
                "--ring-mib=16"
            ]
        );
        assert_eq!(
            expand_with("[dr]\nno-auto-failover = false\n", &["dr"]).unwrap(),
            Vec::<String>::new()
        );
    }

    /// Typos and wrong shapes are refused with the key and the file named.
    #[test]
    fn mistakes_are_named() {
        let error = expand_with("ring-mb = 64\n", &["aux"]).unwrap_err();
        assert!(error.contains("unknown setting `ring-mb`"), "{error}");
        assert!(error.starts_with("config file "), "{error}");
        let error = expand_with("[primry]\nmode = 'async'\n", &["aux"]).unwrap_err();
        assert!(error.contains("unknown section [primry]"), "{error}");
        let error = expand_with("[aux]\nmode = 'async'\n", &["aux"]).unwrap_err();
        assert!(error.contains("[aux] has no setting `mode`"), "{error}");
        let error = expand_with("[dr]\nno-auto-failover = 'yes'\n", &["dr"]).unwrap_err();
        assert!(error.contains("is a switch"), "{error}");
        let error = expand_with("ring-mib = [1, 2]\n", &["aux"]).unwrap_err();
        assert!(
            error.contains("must be a string, a number or a boolean"),
            "{error}"
        );
        let error = expand_with("ring-mib = \n", &["aux"]).unwrap_err();
        assert!(error.starts_with("config file "), "{error}");
        let error = expand_with("config = 'other.toml'\n", &["aux"]).unwrap_err();
        assert!(error.contains("unknown setting `config`"), "{error}");
    }

    /// Commands without a config file, and command lines without --config, pass untouched.
    #[test]
    fn nothing_changes_without_a_config() {
        let args: Vec<OsString> = ["ordinal", "sim", "--config", "x"]
            .iter()
            .map(OsString::from)
            .collect();
        assert_eq!(expand(args.clone(), &cli()).unwrap(), args);
        let args: Vec<OsString> = ["ordinal", "aux", "--ring-mib", "1"]
            .iter()
            .map(OsString::from)
            .collect();
        assert_eq!(expand(args.clone(), &cli()).unwrap(), args);
        let args: Vec<OsString> = ["ordinal", "aux", "--config"]
            .iter()
            .map(OsString::from)
            .collect();
        assert!(expand(args, &cli()).is_err());
    }
}
