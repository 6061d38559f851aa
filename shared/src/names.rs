//! Names of services and hosts, and `k=v` label lists as the command line writes them.

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

/// Parses `k=v,k2=v2` (as `--labels` takes it). An empty string is no labels.
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
        out.insert(k.to_string(), v.to_string());
    }
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
}
