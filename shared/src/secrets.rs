//! Secret values in what cutover shows: the one masking rule used by the coordinator
//! (a plan in `show`, dry runs, the dashboard) and the agent (slot errors and log lines
//! it reports). A variable named in `[run] secret_env` has its value replaced by
//! [`MASK`] wherever that value appears, whichever source set it. Values read from env
//! files on a host never reach the coordinator at all; this rule is for what does.

use std::collections::BTreeMap;

use crate::plan::Plan;

/// What a secret value is shown as.
pub const MASK: &str = "********";

/// The secret values a text may contain.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Secrets {
    /// Longest first, so that a secret holding another is masked whole; never empty
    /// strings (masking "" would mask between every character).
    values: Vec<String>,
}

impl Secrets {
    /// The given values (empty ones and duplicates dropped).
    pub fn new(values: impl IntoIterator<Item = String>) -> Secrets {
        let mut values: Vec<String> = values.into_iter().filter(|v| !v.is_empty()).collect();
        values.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        values.dedup();
        Secrets { values }
    }

    /// The values in `env` of the variables `names` names.
    pub fn of_env<'a>(
        names: &[String],
        env: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Secrets {
        Secrets::new(
            env.into_iter()
                .filter(|(k, _)| names.iter().any(|n| n == k))
                .map(|(_, v)| v.to_string()),
        )
    }

    /// The secret values of `plan`: those of its `[run] env` that `secret_env` names.
    pub fn of_plan(plan: &Plan) -> Secrets {
        Secrets::of_env(
            &plan.run.secret_env,
            plan.run.env.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        )
    }

    /// The secret values themselves, to combine sets.
    pub fn into_values(self) -> Vec<String> {
        self.values
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// `text` with every secret value in it replaced by [`MASK`].
    pub fn mask(&self, text: &str) -> String {
        let mut out = text.to_string();
        for v in &self.values {
            if out.contains(v.as_str()) {
                out = out.replace(v.as_str(), MASK);
            }
        }
        out
    }

    /// `env` with the values of the variables `names` names replaced by [`MASK`], and
    /// any secret value inside the others masked too.
    pub fn mask_env(
        &self,
        names: &[String],
        env: &BTreeMap<String, String>,
    ) -> BTreeMap<String, String> {
        env.iter()
            .map(|(k, v)| {
                let shown = if names.contains(k) {
                    MASK.to_string()
                } else {
                    self.mask(v)
                };
                (k.clone(), shown)
            })
            .collect()
    }
}

impl Plan {
    /// The plan as cutover shows it: the values of the `[run] secret_env` variables
    /// masked in `[run] env` and wherever else they appear in the plan (a command's
    /// argument, an artifact URL, another section's command).
    pub fn masked(&self) -> Plan {
        let secrets = Secrets::of_plan(self);
        let mut shown = self.clone();
        shown.run.env = secrets.mask_env(&self.run.secret_env, &self.run.env);
        if secrets.is_empty() {
            return shown;
        }
        // Every string of every section, whichever section it is: walking the plan as
        // TOML keeps sections added later covered.
        let Ok(mut value) = toml::Value::try_from(&shown) else {
            return shown;
        };
        mask_value(&mut value, &secrets);
        value.try_into().unwrap_or(shown)
    }
}

/// Masks every string in `v`, in place.
fn mask_value(v: &mut toml::Value, secrets: &Secrets) {
    match v {
        toml::Value::String(s) => {
            let masked = secrets.mask(s);
            if masked != *s {
                *s = masked;
            }
        }
        toml::Value::Array(items) => items.iter_mut().for_each(|i| mask_value(i, secrets)),
        toml::Value::Table(t) => t.iter_mut().for_each(|(_, i)| mask_value(i, secrets)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(run_extra: &str) -> Plan {
        let text = format!(
            r#"service = "web"
[release]
version = "1"
artifact = "https://artifacts.example/web.tar.gz?token=s3cr3t-token"
sha256 = "{}"
[run]
command = ["./web", "--dsn", "postgres://app:hunter22@db/app"]
listen = 8080
{run_extra}
[health]
http = "/"
"#,
            "a".repeat(64)
        );
        Plan::parse(&text, "web.toml").unwrap()
    }

    #[test]
    fn a_secret_value_is_masked_wherever_it_appears_and_only_there() {
        let p = plan(
            r#"env = { DATABASE_URL = "postgres://app:hunter22@db/app", TOKEN = "s3cr3t-token", WORKERS = "4" }
secret_env = ["DATABASE_URL", "TOKEN", "FROM_A_FILE"]"#,
        );
        let shown = p.masked();
        assert_eq!(shown.run.env["DATABASE_URL"], MASK);
        assert_eq!(shown.run.env["TOKEN"], MASK);
        assert_eq!(shown.run.env["WORKERS"], "4", "not a secret");
        assert_eq!(shown.run.command[2], MASK, "inside the command too");
        assert!(
            shown.release.artifact.ends_with("token=********"),
            "{}",
            shown.release.artifact
        );
        let text = toml::to_string(&shown).unwrap();
        assert!(
            !text.contains("hunter22") && !text.contains("s3cr3t"),
            "{text}"
        );
        assert_eq!(
            p.run.env["TOKEN"], "s3cr3t-token",
            "the plan itself is kept"
        );
    }

    #[test]
    fn a_plan_without_secrets_is_shown_as_it_is() {
        let p = plan(r#"env = { WORKERS = "4" }"#);
        assert_eq!(p.masked(), p);
    }

    #[test]
    fn the_longest_secret_is_masked_first_and_empty_values_mask_nothing() {
        let s = Secrets::new(["abc".to_string(), "abcdef".into(), String::new()]);
        assert_eq!(s.mask("x abcdef y abc"), format!("x {MASK} y {MASK}"));
        assert_eq!(Secrets::new([String::new()]).mask("text"), "text");
        let env = [("A", "one"), ("B", "two")];
        assert_eq!(
            Secrets::of_env(&["B".into()], env).mask("one two"),
            format!("one {MASK}")
        );
    }
}
