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

#[cfg(test)]
mod tests {
    use super::*;

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
