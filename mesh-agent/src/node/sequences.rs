//! The newest sequence seen of each node's signed documents of one kind,
//! kept in the state folder (`STATE_DIR/sequences-SECTION.json`), so that a
//! restarted agent refuses an older document written back to the store
//! just as the agent before it would have.

use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
};

use super::{NodeName, Section};
use crate::state_file::{read_json, write_json};

#[derive(Debug, thiserror::Error)]
#[error("{}: cannot read the sequences seen", path.display())]
pub struct SequencesError {
    path: PathBuf,
    #[source]
    source: io::Error,
}

#[derive(Debug, Default)]
pub struct Sequences {
    /// Where they are kept; nowhere if `None`.
    path: Option<PathBuf>,
    newest: BTreeMap<NodeName, u64>,
    changed: bool,
}

impl Sequences {
    /// Those kept in `state_dir` for `section`; none if there is no file.
    pub fn load(state_dir: &Path, section: Section) -> Result<Self, SequencesError> {
        let path = state_dir.join(format!("sequences-{}.json", section.name()));
        let newest = read_json(&path).map_err(|source| SequencesError {
            path: path.clone(),
            source,
        })?;
        Ok(Self {
            path: Some(path),
            newest,
            changed: false,
        })
    }

    /// The newest sequence seen of `node`, if `sequence` is older.
    pub fn newer_than(&self, node: &NodeName, sequence: u64) -> Option<u64> {
        self.newest
            .get(node)
            .copied()
            .filter(|&newest| sequence < newest)
    }

    /// Notes a good document of `node` with `sequence`.
    pub fn saw(&mut self, node: &NodeName, sequence: u64) {
        let newest = self.newest.entry(node.clone()).or_default();
        if sequence > *newest {
            *newest = sequence;
            self.changed = true;
        }
    }

    /// Writes them if they changed; a failure is logged, and they hold in
    /// memory meanwhile.
    pub fn save(&mut self) {
        let Some(path) = &self.path else {
            return;
        };
        if !self.changed {
            return;
        }
        match write_json(path, &self.newest) {
            Ok(()) => self.changed = false,
            Err(err) => tracing::error!(
                path = %path.display(),
                error = %err,
                "cannot keep the sequences seen; a restarted agent may take an older document"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let b: NodeName = "b".parse().unwrap();
        let mut seen = Sequences::load(dir.path(), Section::Nodes).unwrap();
        seen.saw(&b, 7);
        seen.saw(&b, 5);
        seen.save();
        let again = Sequences::load(dir.path(), Section::Nodes).unwrap();
        assert_eq!(again.newer_than(&b, 6), Some(7));
        assert_eq!(
            again.newer_than(&b, 7),
            None,
            "the same document may come again"
        );
        assert_eq!(again.newer_than(&"c".parse().unwrap(), 1), None);
        // Each section on its own.
        let bindings = Sequences::load(dir.path(), Section::Bindings).unwrap();
        assert_eq!(bindings.newer_than(&b, 1), None);
    }
}
