//! Names of services and hosts, and labels: the one rule each must follow, and `k=v`
//! label lists as the command line writes them.

use std::collections::BTreeMap;

/// Service and host names: 1-63 characters of `a-z`, `0-9`, `-`, `_`, `.`, starting with a
/// letter or digit. They become file names on hosts and keys in the coordinator's store.
pub fn check_name(kind: &str, name: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c);
    if name.is_empty() {
        return Err(format!("{kind} name is empty"));
    }
    if name.len() > 63 {
        return Err(format!("{kind} name {name:?} is longer than 63 characters"));
    }
    if !name.chars().all(ok_char) || !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(format!(
            "{kind} name {name:?} may only hold a-z, 0-9, '-', '_' and '.', and must start with a letter or digit"
        ));
    }
    Ok(())
}

/// The rule for label keys and values alike: `[A-Za-z0-9][A-Za-z0-9._-]*`, at most 63
/// characters. Returns what is wrong with `text`.
fn label_rule(text: &str) -> Result<(), &'static str> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || "._-".contains(c);
    if text.is_empty() {
        Err("is empty")
    } else if text.len() > 63 {
        Err("is longer than 63 characters")
    } else if !text.chars().all(ok_char) || !text.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        Err("may only hold A-Z, a-z, 0-9, '.', '_' and '-', and must start with a letter or digit")
    } else {
        Ok(())
    }
}

/// Checks a label key alone (as `--allow-labels` lists them).
pub fn check_label_key(key: &str) -> Result<(), String> {
    label_rule(key).map_err(|why| format!("label key {key:?} {why}"))
}

/// Checks one label wherever labels enter: token labels, `join --labels`, a plan's
/// `[targets] labels`. The error names the bad key or value.
pub fn check_label(key: &str, value: &str) -> Result<(), String> {
    check_label_key(key)?;
    label_rule(value).map_err(|why| {
        let hint = if value.contains(['=', ' ']) {
            " (separate labels with commas: k=v,k2=v2)"
        } else {
            ""
        };
        format!("label {key}: value {value:?} {why}{hint}")
    })
}

/// Parses `k=v,k2=v2` (as `--labels` takes it) and checks every key and value. An empty
/// string is no labels.
pub fn parse_labels(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("label {part:?} is not key=value"))?;
        let (k, v) = (k.trim(), v.trim());
        if k.is_empty() {
            return Err(format!("label {part:?} has an empty key"));
        }
        check_label(k, v)?;
        if out.insert(k.to_string(), v.to_string()).is_some() {
            return Err(format!("label {k} is given twice"));
        }
    }
    Ok(out)
}

/// Parses `k1,k2` (as `--allow-labels` takes it): label keys, each checked.
pub fn parse_label_keys(text: &str) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::new();
    for key in text.split(',').map(str::trim).filter(|k| !k.is_empty()) {
        check_label_key(key)?;
        if !out.iter().any(|k| k == key) {
            out.push(key.to_string());
        }
    }
    out.sort();
    Ok(out)
}

/// True when every selector pair is among `labels`.
pub fn labels_match(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name("host", "web-1.eu").is_ok());
        assert!(check_name("host", "").is_err());
        assert!(check_name("host", "Web").is_err());
        assert!(check_name("host", "../x").is_err());
        assert!(check_name("host", "-x").is_err());
    }

    #[test]
    fn labels() {
        let l = parse_labels("env=prod, role=web").unwrap();
        assert_eq!(l.get("env").map(String::as_str), Some("prod"));
        assert_eq!(l.len(), 2);
        assert!(parse_labels("").unwrap().is_empty());
        assert!(parse_labels("env").is_err());
        assert!(parse_labels("=x").is_err());
        let sel = parse_labels("env=prod").unwrap();
        assert!(labels_match(&sel, &l));
        assert!(!labels_match(&parse_labels("env=dev").unwrap(), &l));
    }

    #[test]
    fn label_syntax_is_one_rule_for_keys_and_values() {
        assert!(check_label("Env.1", "eu-west_2").is_ok());
        assert!(check_label(&"k".repeat(63), &"v".repeat(63)).is_ok());
        // A space where a comma belongs: the value is named, with the hint.
        let e = parse_labels("env=prod role=web").unwrap_err();
        assert!(e.contains("label env: value \"prod role=web\""), "{e}");
        assert!(e.contains("separate labels with commas"), "{e}");
        let e = parse_labels("my key=x").unwrap_err();
        assert!(e.contains("label key \"my key\""), "{e}");
        for (k, v) in [
            ("env", ""),
            ("-env", "x"),
            ("env", ".x"),
            ("env", "a/b"),
            ("é", "x"),
            ("env", "x\n"),
        ] {
            assert!(check_label(k, v).is_err(), "{k}={v:?}");
        }
        let e = check_label(&"k".repeat(64), "x").unwrap_err();
        assert!(e.contains("longer than 63"), "{e}");
        let e = check_label("env", &"v".repeat(64)).unwrap_err();
        assert!(e.starts_with("label env: value"), "{e}");
        assert!(parse_labels("env=a,env=b").unwrap_err().contains("twice"));
    }

    #[test]
    fn label_keys() {
        assert_eq!(
            parse_label_keys("role, zone,role").unwrap(),
            vec!["role".to_string(), "zone".to_string()]
        );
        assert!(parse_label_keys("").unwrap().is_empty());
        let e = parse_label_keys("role,bad key").unwrap_err();
        assert!(e.contains("label key \"bad key\""), "{e}");
    }
}
