//! `${NAME}` placeholders in plan strings, checked against the names a key allows: a
//! typo like `${PROT}` is refused with the nearest known name instead of reaching a
//! process as literal text. Each key brings its own set (`[run]` knows `${PORT}`).

use std::fmt;

/// A placeholder that a string may not hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// `${name}` is not one of `known`.
    Unknown { name: String, known: Vec<String> },
    /// A `${` with no `}` after it.
    Unclosed,
}

impl std::error::Error for Error {}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Unknown { name, known } => {
                write!(f, "unknown variable ${{{name}}}")?;
                let words: Vec<&str> = known.iter().map(String::as_str).collect();
                match crate::plan::nearest(name, &words) {
                    Some(best) => write!(f, ": did you mean ${{{best}}}?"),
                    None => {
                        let list: Vec<String> = known.iter().map(|k| format!("${{{k}}}")).collect();
                        match list.as_slice() {
                            [] => write!(f, "; no variables are replaced here"),
                            [one] => write!(f, "; the only variable here is {one}"),
                            _ => write!(f, "; the variables here are {}", list.join(", ")),
                        }
                    }
                }
            }
            Error::Unclosed => write!(f, "\"${{\" without a closing \"}}\": write ${{NAME}}"),
        }
    }
}

/// Checks every `${NAME}` in `text` against `known`.
pub fn check(text: &str, known: &[&str]) -> Result<(), Error> {
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or(Error::Unclosed)?;
        let name = &after[..end];
        if !known.contains(&name) {
            return Err(Error::Unknown {
                name: name.to_string(),
                known: known.iter().map(|k| k.to_string()).collect(),
            });
        }
        rest = &after[end + 1..];
    }
    Ok(())
}

/// `text` with every `${NAME}` whose name is in `values` replaced by its value, in one
/// pass: a value that itself holds `${...}` is not expanded again. Names not in `values`
/// (which [`check`] would have refused) and an unclosed `${` stay as written.
pub fn fill(text: &str, values: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else { break };
        out.push_str(&rest[..start]);
        let name = &after[..end];
        match values.iter().find(|(n, _)| *n == name) {
            Some((_, v)) => out.push_str(v),
            None => out.push_str(&rest[start..start + 2 + end + 1]),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_replaces_known_names_once() {
        let v = [
            ("SERVICE", "web"),
            ("RELEASE", "2.0"),
            ("HOST", "${RELEASE}"),
        ];
        assert_eq!(
            fill(
                r#"rate(x{service="${SERVICE}",release="${RELEASE}"}[30s])"#,
                &v
            ),
            r#"rate(x{service="web",release="2.0"}[30s])"#
        );
        assert_eq!(
            fill("${HOST}", &v),
            "${RELEASE}",
            "values are not expanded again"
        );
        assert_eq!(fill("${OTHER} and ${SERVICE", &v), "${OTHER} and ${SERVICE");
        assert_eq!(fill("", &v), "");
        assert_eq!(fill("${SERVICE}${SERVICE}", &v), "webweb");
        assert_eq!(fill("héllo ${SERVICE} ü", &v), "héllo web ü");
    }

    #[test]
    fn known_names_pass_and_typos_get_a_suggestion() {
        assert_eq!(check("--port=${PORT}", &["PORT"]), Ok(()));
        assert_eq!(check("no placeholders, $PORT or {PORT}", &["PORT"]), Ok(()));
        assert_eq!(check("${PORT}:${PORT}", &["PORT"]), Ok(()));
        let e = check("--port=${PROT}", &["PORT"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown variable ${PROT}: did you mean ${PORT}?"
        );
        let e = check("${HOME}/x", &["PORT"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown variable ${HOME}; the only variable here is ${PORT}"
        );
        let set = ["SERVICE", "RELEASE", "PREVIOUS_RELEASE", "HOST"];
        let e = check("x{release=\"${RELASE}\"}", &set).unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown variable ${RELASE}: did you mean ${RELEASE}?"
        );
        let e = check("${NOPE}", &set).unwrap_err();
        assert!(e.to_string().ends_with(
            "the variables here are ${SERVICE}, ${RELEASE}, ${PREVIOUS_RELEASE}, ${HOST}"
        ));
        assert_eq!(
            check("${}", &["PORT"]).map_err(|e| e.to_string()),
            Err("unknown variable ${}; the only variable here is ${PORT}".into())
        );
        assert_eq!(check("--port=${PORT", &["PORT"]), Err(Error::Unclosed));
    }
}
