//! Renders of one original that wait for a render slot at the same time, gathered so that one decode
//! serves them all ([`super::shared`]).
//!
//! The first render of an original to wait for a slot opens a group and leads it; renders of other
//! versions of the same original that arrive while the leader waits for its slot or decodes join
//! the group and wait for their result instead of a slot of their own. When the leader gets its
//! slot it takes the members so far ([`Lease::take`]) and renders them with its own version from
//! one decode; members that arrive meanwhile are taken after ([`Lease::take_more_or_close`]) and
//! served from the same decode when it is large enough. The group closes when the leader finds no
//! one new, or goes away (its client left, or it rendered alone): members still waiting then render
//! alone.
//!
//! An original is known by its buffer: every render of one download is handed the same bytes by the
//! originals cache, and the leader holds them, so the address cannot be reused while its group is
//! open.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::oneshot;

use super::{ImageError, RenderSpec, Rendered};

/// The buffer's address and length.
type OriginalId = (usize, usize);

/// One render waiting on a group's leader.
pub(super) struct Member {
    /// What it asks for.
    pub(super) spec: RenderSpec,
    /// Where its result goes.
    pub(super) tx: oneshot::Sender<Result<Rendered, ImageError>>,
}

/// The open groups.
#[derive(Default)]
pub(super) struct Groups {
    open: Mutex<HashMap<OriginalId, Vec<Member>>>,
}

impl std::fmt::Debug for Groups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Groups").finish_non_exhaustive()
    }
}

/// What [`Groups::join`] made of a render.
pub(super) enum Role {
    /// It leads a new group: it takes a slot and renders the members it finds ([`Lease::take`]).
    Leader(Lease),
    /// It joined a group: its result will come from the leader (an error if the leader went away).
    Member(oneshot::Receiver<Result<Rendered, ImageError>>),
}

/// A leader's hold on its open group; dropping it unclosed drops the group and its members' senders.
pub(super) struct Lease {
    groups: Arc<Groups>,
    id: OriginalId,
    open: bool,
}

impl Groups {
    /// Joins the open group of `original`, or opens one.
    pub(super) fn join(self: &Arc<Self>, original: &Bytes, spec: &RenderSpec) -> Role {
        let id = (original.as_ptr() as usize, original.len());
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(members) = open.get_mut(&id) {
            let (tx, rx) = oneshot::channel();
            members.push(Member {
                spec: spec.clone(),
                tx,
            });
            return Role::Member(rx);
        }
        open.insert(id, Vec::new());
        Role::Leader(Lease {
            groups: self.clone(),
            id,
            open: true,
        })
    }

    /// Members waiting in open groups (tests wait for renders to join).
    #[cfg(test)]
    pub(super) fn waiting(&self) -> usize {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.values().map(Vec::len).sum()
    }

    fn remove(&self, id: OriginalId) -> Vec<Member> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.remove(&id).unwrap_or_default()
    }
}

impl Lease {
    /// The members so far; the group stays open to later arrivals.
    pub(super) fn take(&self) -> Vec<Member> {
        let mut open = self.groups.open.lock().unwrap_or_else(|e| e.into_inner());
        open.get_mut(&self.id)
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// The members that arrived since the last take, or, when none did, closes the group (in one
    /// step, so no arrival is lost between the two).
    pub(super) fn take_more_or_close(&mut self) -> Vec<Member> {
        let mut open = self.groups.open.lock().unwrap_or_else(|e| e.into_inner());
        match open.get_mut(&self.id) {
            Some(members) if !members.is_empty() => std::mem::take(members),
            _ => {
                open.remove(&self.id);
                self.open = false;
                Vec::new()
            }
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.open {
            // The members' receivers see their senders dropped and render alone.
            drop(self.groups.remove(self.id));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::fixtures::spec;
    use crate::request::{Format, Version};

    #[test]
    fn the_first_leads_the_others_join_until_it_closes() {
        let groups = Arc::new(Groups::default());
        let original = Bytes::from_static(b"an original");
        let other = Bytes::from(b"an original".to_vec());
        let Role::Leader(mut lease) =
            groups.join(&original, &spec(Version::Width(10), Format::Jpeg))
        else {
            panic!("the first render leads");
        };
        let joined = groups.join(&original, &spec(Version::Width(20), Format::Jpeg));
        assert!(matches!(joined, Role::Member(_)));
        // Equal bytes in another buffer are another download: a group of its own.
        assert!(matches!(
            groups.join(&other, &spec(Version::Width(30), Format::Jpeg)),
            Role::Leader(_)
        ));
        let members = lease.take();
        assert_eq!(members.len(), 1);
        assert_eq!(members[0].spec.version, Version::Width(20));
        // Still open while the leader works: a late arrival joins, and is taken next.
        assert!(matches!(
            groups.join(&original, &spec(Version::Width(25), Format::Jpeg)),
            Role::Member(_)
        ));
        let late = lease.take_more_or_close();
        assert_eq!(late.len(), 1);
        assert!(lease.take_more_or_close().is_empty(), "no one new: closed");
        // Closed: the next render of the original leads a new group.
        assert!(matches!(
            groups.join(&original, &spec(Version::Width(40), Format::Jpeg)),
            Role::Leader(_)
        ));
    }

    #[tokio::test]
    async fn a_leader_that_goes_away_releases_its_members() {
        let groups = Arc::new(Groups::default());
        let original = Bytes::from_static(b"an original");
        let lease = groups.join(&original, &spec(Version::Width(10), Format::Jpeg));
        let Role::Member(rx) = groups.join(&original, &spec(Version::Width(20), Format::Jpeg))
        else {
            panic!("joins");
        };
        drop(lease);
        assert!(rx.await.is_err(), "the member learns it must render alone");
        assert!(matches!(
            groups.join(&original, &spec(Version::Width(30), Format::Jpeg)),
            Role::Leader(_)
        ));
    }
}
