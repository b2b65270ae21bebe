//! The Hub's repo-id grammar: `org/name[@revision][:file]`.

/// A model named the way the Hub names it: `org/name`, a revision (branch, tag or
/// commit; `main` by default) and, for a GGUF repository, one file.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RepoRef {
    pub repo: String,
    pub revision: String,
    pub file: Option<String>,
}

impl RepoRef {
    /// `org/name[@revision][:file]`, or `None` where `s` is not of that form.
    pub fn parse(s: &str) -> Option<RepoRef> {
        let (rest, file) = match s.split_once(':') {
            Some((r, f)) if !f.is_empty() && !f.starts_with('/') && !f.split('/').any(|p| p == "..") => (r, Some(f.to_string())),
            Some(_) => return None,
            None => (s, None),
        };
        let (repo, revision) = match rest.split_once('@') {
            Some((r, v)) if !v.is_empty() => (r, v.to_string()),
            Some(_) => return None,
            None => (rest, "main".to_string()),
        };
        let (org, name) = repo.split_once('/')?;
        let part = |p: &str| !p.is_empty() && !p.starts_with('.') && !p.starts_with('-') && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        (part(org) && part(name)).then(|| RepoRef { repo: repo.to_string(), revision, file })
    }
}

impl std::fmt::Display for RepoRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.repo, self.revision)?;
        if let Some(file) = &self.file {
            write!(f, ":{file}")?;
        }
        Ok(())
    }
}
