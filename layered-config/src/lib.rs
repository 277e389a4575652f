//! The configuration loader every nanofleet binary uses, so that all of them layer the
//! same way: defaults < TOML file < `NANOFLEET_*` environment < command-line flags.

use std::path::Path;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::de::DeserializeOwned;
use serde::Serialize;

pub type Error = Box<figment::Error>;

/// A configuration value that must not be printed: `Debug` shows `<redacted>`, so a logged
/// or dumped configuration never carries it. Read it with [`Secret::expose`].
#[derive(Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Loads `T` from its defaults, then `file` (which must exist when given), then the
/// `NANOFLEET_<KEY>` variables for `env_keys` (only those, so that the variables of
/// one binary never leak into another's), then `flags`, which should serialize only
/// the options given on the command line.
pub fn load<T>(file: Option<&Path>, env_keys: &[&str], flags: impl Serialize) -> Result<T, Error>
where
    T: Serialize + DeserializeOwned + Default,
{
    let mut figment = Figment::from(Serialized::defaults(T::default()));
    if let Some(file) = file {
        if !file.exists() {
            return Err(Box::new(figment::Error::from(format!(
                "configuration file {} does not exist",
                file.display()
            ))));
        }
        figment = figment.merge(Toml::file(file));
    }
    figment
        .merge(Env::prefixed("NANOFLEET_").only(env_keys))
        .merge(Serialized::globals(flags))
        .extract()
        .map_err(Box::new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(default)]
    struct Config {
        a: u32,
        b: u32,
        c: u32,
        d: u32,
    }

    impl Default for Config {
        fn default() -> Self {
            Self {
                a: 1,
                b: 1,
                c: 1,
                d: 1,
            }
        }
    }

    #[derive(Serialize)]
    struct Flags {
        #[serde(skip_serializing_if = "Option::is_none")]
        d: Option<u32>,
    }

    #[test]
    fn secrets_do_not_print_but_load() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret:?}"), "<redacted>");
        #[derive(Serialize, Deserialize)]
        struct WithSecret {
            key: Secret,
        }
        let loaded: WithSecret = Figment::from(Serialized::defaults(WithSecret { key: secret }))
            .extract()
            .unwrap();
        assert_eq!(loaded.key.expose(), "hunter2");
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API returns its own error type
    fn layers_apply_in_order() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("c.toml", "b = 2\nc = 2\nd = 2")?;
            jail.set_env("NANOFLEET_C", "3");
            jail.set_env("NANOFLEET_D", "3");
            jail.set_env("NANOFLEET_A", "9"); // not in env_keys: ignored
            let config: Config = load(Some(Path::new("c.toml")), &["c", "d"], Flags { d: Some(4) })
                .map_err(|e| *e)?;
            assert_eq!(
                config,
                Config {
                    a: 1,
                    b: 2,
                    c: 3,
                    d: 4
                }
            );
            let config: Config =
                load(Some(Path::new("c.toml")), &["c", "d"], Flags { d: None }).map_err(|e| *e)?;
            assert_eq!(config.d, 3);
            Ok(())
        });
    }

    #[test]
    fn missing_file_is_an_error() {
        let err = load::<Config>(Some(Path::new("/nonexistent.toml")), &[], Flags { d: None })
            .unwrap_err();
        assert!(err.to_string().contains("does not exist"));
    }
}
