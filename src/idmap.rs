//! Owner translation between the layers on disk and the merged view: fuse-overlayfs's
//! `uidmapping=`/`gidmapping=` ranges (`CONTAINER:HOST:COUNT`, several joined by `:`) and the
//! `squash_to_*` options. As in fuse-overlayfs, files on disk carry container ids and the
//! mount shows host ids: with `0:1000:1`, a file owned by 0 on disk is shown owned by 1000,
//! which a user namespace mapping 1000 to 0 sees as its root again.

/// One range: view (host) ids `view..view+count` are stored on disk as container ids
/// `disk..disk+count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub view: u32,
    pub disk: u32,
    pub count: u32,
}

pub const OVERFLOW_ID: u32 = 65534;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdMap {
    pub uids: Vec<Range>,
    pub gids: Vec<Range>,
    pub squash_uid: Option<u32>,
    pub squash_gid: Option<u32>,
}

fn to_view(ranges: &[Range], disk: u32) -> u32 {
    if ranges.is_empty() {
        return disk;
    }
    ranges
        .iter()
        .find(|r| disk >= r.disk && disk - r.disk < r.count)
        .map(|r| r.view + (disk - r.disk))
        .unwrap_or(OVERFLOW_ID)
}

fn to_disk(ranges: &[Range], view: u32) -> Option<u32> {
    if ranges.is_empty() {
        return Some(view);
    }
    ranges
        .iter()
        .find(|r| view >= r.view && view - r.view < r.count)
        .map(|r| r.disk + (view - r.view))
}

impl IdMap {
    pub fn is_identity(&self) -> bool {
        *self == IdMap::default()
    }

    pub fn squashes(&self) -> bool {
        self.squash_uid.is_some() || self.squash_gid.is_some()
    }

    pub fn uid_to_view(&self, disk: u32) -> u32 {
        self.squash_uid.unwrap_or_else(|| to_view(&self.uids, disk))
    }

    pub fn gid_to_view(&self, disk: u32) -> u32 {
        self.squash_gid.unwrap_or_else(|| to_view(&self.gids, disk))
    }

    /// Whether ids are translated by ranges (`uidmapping`/`gidmapping`).
    pub fn maps_ranges(&self) -> bool {
        !self.uids.is_empty() || !self.gids.is_empty()
    }

    /// A uid named in an ACL entry, as the view shows it: by the ranges only (a squash is
    /// about owners; the entries keep naming the users they name).
    pub fn acl_uid_to_view(&self, disk: u32) -> u32 {
        to_view(&self.uids, disk)
    }

    pub fn acl_gid_to_view(&self, disk: u32) -> u32 {
        to_view(&self.gids, disk)
    }

    /// The on-disk uid for a view uid; `None` when it has no mapping (EINVAL to the caller).
    pub fn uid_to_disk(&self, view: u32) -> Option<u32> {
        to_disk(&self.uids, view)
    }

    pub fn gid_to_disk(&self, view: u32) -> Option<u32> {
        to_disk(&self.gids, view)
    }
}

/// Parses `C:H:N[:C:H:N...]`.
pub fn parse_ranges(s: &str) -> Result<Vec<Range>, String> {
    // containers-storage writes `uidmapping=:0:1000:1:...` (a ':' before every range);
    // empty fields are skipped, as fuse-overlayfs does.
    let nums: Vec<&str> = s.split(':').filter(|x| !x.is_empty()).collect();
    if nums.is_empty() || nums.len() % 3 != 0 {
        return Err(format!(
            "expected CONTAINER:HOST:COUNT triples separated by ':', got {s:?}"
        ));
    }
    let mut out = Vec::new();
    for t in nums.chunks(3) {
        let parse = |x: &str| {
            x.parse::<u32>()
                .map_err(|_| format!("{x:?} is not a number in {s:?}"))
        };
        let r = Range {
            disk: parse(t[0])?,
            view: parse(t[1])?,
            count: parse(t[2])?,
        };
        if r.count == 0 {
            return Err(format!("a range with count 0 in {s:?}"));
        }
        if r.view.checked_add(r.count - 1).is_none() || r.disk.checked_add(r.count - 1).is_none() {
            return Err(format!("a range past the largest id in {s:?}"));
        }
        out.push(r);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_translate_both_ways() {
        // fuse-overlayfs's man page example: a user namespace mapping 0 -> 1000 and
        // 1.. -> 110000..; files owned 0:0 and 1:1 on disk must appear as the namespace's 0 and 1.
        let m = IdMap {
            uids: parse_ranges("0:1000:1:1:110000:65536").unwrap(),
            ..Default::default()
        };
        assert_eq!(m.uid_to_view(0), 1000);
        assert_eq!(m.uid_to_view(1), 110000);
        assert_eq!(m.uid_to_view(6), 110005);
        assert_eq!(m.uid_to_view(70000), OVERFLOW_ID);
        assert_eq!(m.uid_to_disk(1000), Some(0));
        assert_eq!(m.uid_to_disk(110005), Some(6));
        assert_eq!(m.uid_to_disk(5), None);
        assert_eq!(m.gid_to_view(42), 42, "no gid ranges: identity");
    }

    #[test]
    fn containers_storage_leading_colon_is_accepted() {
        // What containers-storage actually sends: a ':' before every range.
        assert_eq!(
            parse_ranges(":0:1000:1:1:100000:65536").unwrap(),
            parse_ranges("0:1000:1:1:100000:65536").unwrap()
        );
        assert!(parse_ranges(":").is_err());
        assert!(parse_ranges("").is_err());
    }

    #[test]
    fn bad_ranges_are_refused() {
        assert!(parse_ranges("0:1000").is_err());
        assert!(parse_ranges("0:x:1").is_err());
        assert!(parse_ranges("0:1000:0").is_err());
        assert!(parse_ranges("4294967295:0:2").is_err());
    }

    #[test]
    fn squash_wins() {
        let m = IdMap {
            squash_uid: Some(0),
            squash_gid: Some(0),
            ..Default::default()
        };
        assert_eq!(m.uid_to_view(1234), 0);
        assert_eq!(m.gid_to_view(1234), 0);
    }
}
