//! What a workspace declares: its named systems and scenarios, handed to the engine by the
//! workspace's own `xtask` ([`crate::cli::main`]). Every subcommand looks names up here;
//! nothing is compiled into the engine.

use std::sync::OnceLock;

use crate::systems::System;
use crate::vm::scenario::Scenario;

/// A workspace's named systems and scenarios.
///
/// ```
/// use vm_xtask::systems::{self, Package};
/// use vm_xtask::Catalog;
///
/// let mut jq = systems::minimal();
/// jq.name = "jq".into();
/// jq.packages.push(Package::Debian { package: "jq".into() });
/// let catalog = Catalog::new().systems([systems::minimal(), jq]).default_system("jq");
/// assert_eq!(catalog.default_name(), "jq");
/// assert!(catalog.system("minimal").is_some());
/// ```
#[derive(Default)]
pub struct Catalog {
    systems: Vec<System>,
    scenarios: Vec<Scenario>,
    default_system: Option<String>,
}

static CURRENT: OnceLock<Catalog> = OnceLock::new();

impl Catalog {
    /// An empty catalog.
    pub fn new() -> Catalog {
        Catalog::default()
    }

    /// Adds systems, in the order `cargo xtask systems` lists them.
    pub fn systems(mut self, systems: impl IntoIterator<Item = System>) -> Catalog {
        self.systems.extend(systems);
        self
    }

    /// Adds scenarios (`cargo xtask scenario NAME`).
    pub fn scenarios(mut self, scenarios: impl IntoIterator<Item = Scenario>) -> Catalog {
        self.scenarios.extend(scenarios);
        self
    }

    /// Names the system used when no `--system` is given (default: the first one added).
    pub fn default_system(mut self, name: &str) -> Catalog {
        self.default_system = Some(name.to_string());
        self
    }

    /// Every system, in order.
    pub fn all_systems(&self) -> &[System] {
        &self.systems
    }

    /// Every scenario, in order.
    pub fn all_scenarios(&self) -> &[Scenario] {
        &self.scenarios
    }

    /// The system called `name`.
    pub fn system(&self, name: &str) -> Option<&System> {
        self.systems.iter().find(|s| s.name == name)
    }

    /// The scenario called `name`.
    pub fn scenario(&self, name: &str) -> Option<&Scenario> {
        self.scenarios.iter().find(|s| s.name == name)
    }

    /// The name of the system used when no `--system` is given (empty when there is none).
    pub fn default_name(&self) -> String {
        self.default_system.clone().or_else(|| self.systems.first().map(|s| s.name.clone())).unwrap_or_default()
    }

    /// Problems that make the catalog unusable: names given twice, a default that is not
    /// declared, a name that is no valid system name.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for (what, names) in [
            ("system", self.systems.iter().map(|s| &s.name).collect::<Vec<_>>()),
            ("scenario", self.scenarios.iter().map(|s| &s.name).collect()),
        ] {
            let mut seen = std::collections::BTreeSet::new();
            for name in names {
                if !seen.insert(name) {
                    problems.push(format!("the {what} `{name}` is declared twice"));
                }
                if !is_name(name) {
                    problems.push(format!(
                        "{name:?} is no {what} name (a letter or digit, then letters, digits, `-`, `_`, `.`)"
                    ));
                }
            }
        }
        if let Some(name) = &self.default_system {
            if self.system(name).is_none() {
                problems.push(format!("the default system `{name}` is not declared"));
            }
        }
        problems
    }

    /// Makes this the catalog of the process (once; later calls are ignored).
    pub fn install(self) {
        let _ = CURRENT.set(self);
    }

    /// The catalog of the process: the one [`Catalog::install`]ed (by
    /// [`crate::cli::main`]), else an empty one.
    pub fn current() -> &'static Catalog {
        CURRENT.get_or_init(Catalog::new)
    }
}

/// Whether `name` can name a system or scenario: it becomes part of item names and file
/// names.
fn is_name(name: &str) -> bool {
    name.len() <= 64
        && name.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twice_declared_names_and_an_undeclared_default_are_problems() {
        let catalog =
            Catalog::new().systems([crate::systems::minimal(), crate::systems::minimal()]).default_system("nope");
        let problems = catalog.problems();
        assert!(problems.iter().any(|p| p.contains("`minimal` is declared twice")), "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("`nope` is not declared")), "{problems:?}");
        assert!(Catalog::new().systems([crate::systems::minimal()]).problems().is_empty());
        for bad in ["", "..", "-x", "a/b", "a b", "a\nb"] {
            let mut system = crate::systems::minimal();
            system.name = bad.into();
            let problems = Catalog::new().systems([system]).problems();
            assert!(problems.iter().any(|p| p.contains("is no system name")), "{bad:?}: {problems:?}");
        }
    }
}
