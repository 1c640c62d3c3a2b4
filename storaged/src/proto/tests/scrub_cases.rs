//! Hand-built scrub bodies for each check a receiver makes: bounds, kinds,
//! flags, unused fields, texts; and the node's fitting of a large report
//! into one frame.

use super::{decode, encode, raw_frame, u64s};
use crate::proto::*;
use crate::record::SegmentId;
use crate::scrub::{Area, AreaReport, Damaged, Filter, Finding, LEFT_LISTED_MAX, PassReport, Status};

fn body_of(msg: &Message) -> Vec<u8> {
    encode(1, msg)[FRAME_HEADER_BYTES..].to_vec()
}

fn decode_body(kind: MessageType, body: &[u8]) -> Result<Message, ProtoError> {
    decode(&raw_frame(1, kind as u8, 0, 1, body)).map(|f| f.expect("a whole frame").0.message)
}

fn bad_scrub(r: Result<Message, ProtoError>, needle: &str) {
    match r {
        Err(ProtoError::BadScrub(text)) => assert!(text.contains(needle), "{text:?} lacks {needle:?}"),
        other => panic!("expected BadScrub({needle:?}), got {other:?}"),
    }
}

const SEG: SegmentId = SegmentId { volume: 1, pg: 2 };

/// One area (the segment 1/2) with one page version left.
fn status() -> Status {
    Status {
        running: None,
        last: Some(PassReport {
            pass: 7,
            priority: true,
            started_unix_secs: 100,
            ended_unix_secs: 160,
            bytes_read: 1 << 20,
            areas: vec![(
                Area::Segment(SEG),
                AreaReport {
                    blocks_checked: 10,
                    pages_checked: 20,
                    found: 2,
                    repaired: 1,
                    left: vec![Finding {
                        offset: 4096,
                        what: Damaged::PageVersion { page: 70, lsn: 1234 },
                        error: "CRC".into(),
                        repaired: false,
                    }],
                },
            )],
        }),
        found_total: 2,
        repaired_total: 1,
        left_now: 1,
    }
}

// Offsets in the body of `status()` (docs/protocol.md, ScrubStatusOk).
const PARTS: usize = 24;
const PRIORITY: usize = 33;
const AREAS: usize = 58;
const AREA_KIND: usize = 62;
const AREA_VOLUME: usize = 63;
const REPAIRED: usize = 99;
const LISTED: usize = 107;
const WHAT: usize = 119;
const PAGE: usize = 120;
const LSN: usize = 128;
const FLAGS: usize = 136;
const TEXT_LEN: usize = 137;
const TEXT: usize = 139;

#[test]
fn the_documented_offsets_hold() {
    let body = body_of(&Message::ScrubStatusOk { status: status() });
    assert_eq!(body.len(), TEXT + 3);
    assert_eq!(body[PARTS], 2, "a last pass, nothing running");
    assert_eq!(body[PRIORITY], 1);
    assert_eq!(body[AREAS..AREAS + 4], 1u32.to_le_bytes());
    assert_eq!(body[AREA_KIND], 1);
    assert_eq!(body[AREA_VOLUME..AREA_VOLUME + 8], 1u64.to_le_bytes());
    assert_eq!(body[LISTED..LISTED + 4], 1u32.to_le_bytes());
    assert_eq!(body[WHAT], 2);
    assert_eq!(body[PAGE..PAGE + 8], 70u64.to_le_bytes());
    assert_eq!(body[LSN..LSN + 8], 1234u64.to_le_bytes());
    assert_eq!(body[TEXT_LEN..TEXT_LEN + 2], 3u16.to_le_bytes());
    assert_eq!(&body[TEXT..], b"CRC");
    assert_eq!(
        decode_body(MessageType::ScrubStatusOk, &body),
        Ok(Message::ScrubStatusOk { status: status() })
    );
}

#[test]
fn a_scrub_status_report_breaking_a_rule_is_refused() {
    let good = body_of(&Message::ScrubStatusOk { status: status() });
    let patched = |at: usize, bytes: &[u8]| {
        let mut b = good.clone();
        b[at..at + bytes.len()].copy_from_slice(bytes);
        decode_body(MessageType::ScrubStatusOk, &b)
    };
    bad_scrub(patched(PARTS, &[4]), "unknown parts");
    bad_scrub(patched(PRIORITY, &[2]), "not 0 or 1");
    bad_scrub(patched(AREA_KIND, &[2]), "unknown area kind");
    bad_scrub(patched(AREA_KIND, &[0]), "the log area names a segment");
    bad_scrub(patched(REPAIRED, &3u64.to_le_bytes()), "3 repaired of 2 found");
    bad_scrub(patched(LISTED, &2u32.to_le_bytes()), "2 findings listed of 1 left");
    bad_scrub(patched(WHAT, &[9]), "unknown finding kind");
    // A log block or an older slot names no LSN; a log block no page.
    bad_scrub(patched(WHAT, &[1]), "must be 0");
    bad_scrub(patched(WHAT, &[3]), "must be 0");
    bad_scrub(patched(FLAGS, &[2]), "not 0 or 1");
    bad_scrub(patched(TEXT_LEN, &257u16.to_le_bytes()), "257 bytes");
    assert_eq!(patched(TEXT, &[0xff]), Err(ProtoError::BadUtf8));
    // Every cut of the body is refused, and a byte more too.
    for cut in 0..good.len() {
        assert!(
            decode_body(MessageType::ScrubStatusOk, &good[..cut]).is_err(),
            "cut at {cut}"
        );
    }
    let long = [good.as_slice(), &[0]].concat();
    assert!(matches!(
        decode_body(MessageType::ScrubStatusOk, &long),
        Err(ProtoError::BodyTooLong { .. })
    ));
}

#[test]
fn counts_are_bounded_before_they_size_anything() {
    // 2^32 - 1 areas declared after the pass's fields, none there.
    let mut body = body_of(&Message::ScrubStatusOk { status: status() });
    body.truncate(AREA_KIND);
    body[AREAS..AREAS + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    bad_scrub(decode_body(MessageType::ScrubStatusOk, &body), "4294967295 areas");
    // More listed findings than a report may list, with enough left.
    let mut body = body_of(&Message::ScrubStatusOk { status: status() });
    body[LISTED - 32..LISTED - 24].copy_from_slice(&1000u64.to_le_bytes());
    body[LISTED..LISTED + 4].copy_from_slice(&(LEFT_LISTED_MAX as u32 + 1).to_le_bytes());
    bad_scrub(decode_body(MessageType::ScrubStatusOk, &body), "at most 64");
    // A filter of u32::MAX segments in a 5-byte body.
    let filter = [vec![1], u32::MAX.to_le_bytes().to_vec()].concat();
    bad_scrub(decode_body(MessageType::Scrub, &filter), "4294967295 segments");
}

#[test]
fn scrub_filters_are_checked() {
    let all = body_of(&Message::Scrub { filter: Filter::All });
    assert_eq!(all, [0, 0, 0, 0, 0]);
    let two = Message::Scrub {
        filter: Filter::Segments(vec![SEG, SegmentId { volume: 1, pg: 3 }]),
    };
    let body = body_of(&two);
    assert_eq!(body.len(), 5 + 2 * 12);
    assert_eq!(decode_body(MessageType::Scrub, &body), Ok(two));
    bad_scrub(decode_body(MessageType::Scrub, &[0, 1, 0, 0, 0]), "names 1 segments");
    bad_scrub(decode_body(MessageType::Scrub, &[2, 0, 0, 0, 0]), "unknown filter kind");
    assert!(matches!(
        decode_body(MessageType::Scrub, &body[..body.len() - 1]),
        Err(ProtoError::BodyTooShort { .. })
    ));
    assert!(matches!(
        decode_body(MessageType::Scrub, &[0, 0, 0]),
        Err(ProtoError::BodyTooShort { need: 5, .. })
    ));
    // The encoder refuses what a node would refuse.
    let many = Message::Scrub {
        filter: Filter::Segments(vec![SEG; SCRUB_SEGMENTS_MAX + 1]),
    };
    assert!(matches!(
        encode_frame(1, &many, &mut Vec::new()),
        Err(ProtoError::BadScrub(_))
    ));
    let most = Message::Scrub {
        filter: Filter::Segments(vec![SEG; SCRUB_SEGMENTS_MAX]),
    };
    assert_eq!(decode_body(MessageType::Scrub, &body_of(&most)), Ok(most));
}

#[test]
fn fixed_scrub_bodies_must_be_exact() {
    assert_eq!(body_of(&Message::ScrubStatus), Vec::<u8>::new());
    assert!(matches!(
        decode_body(MessageType::ScrubStatus, &[0]),
        Err(ProtoError::BodyTooLong { .. })
    ));
    let at = Message::GetPageAt {
        volume: 1,
        pg: 2,
        installed_epoch: 3,
        membership_epoch: 4,
        page: 5,
        lsn: 6,
    };
    let body = body_of(&at);
    assert_eq!(body.len(), 44);
    assert_eq!(body[12..], u64s(&[3, 4, 5, 6]));
    assert!(matches!(
        decode_body(MessageType::GetPageAt, &body[..43]),
        Err(ProtoError::BodyTooShort { .. })
    ));
    assert!(matches!(
        decode_body(MessageType::GetPageAt, &[body.as_slice(), &[0]].concat()),
        Err(ProtoError::BodyTooLong { .. })
    ));
    assert!(matches!(
        decode_body(MessageType::ScrubStarted, &[0; 7]),
        Err(ProtoError::BodyTooShort { .. })
    ));
    // A page whose declared length is not the rest of the body.
    let page = body_of(&Message::PageAt {
        volume: 1,
        pg: 2,
        page: 3,
        lsn: 4,
        bytes: vec![9; 16],
    });
    assert_eq!(page.len(), 32 + 16);
    assert!(matches!(
        decode_body(MessageType::PageAt, &page[..40]),
        Err(ProtoError::BodyTooShort { .. })
    ));
    let mut huge = page.clone();
    huge[28..32].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        decode_body(MessageType::PageAt, &huge),
        Err(ProtoError::BodyTooShort { .. })
    ));
}

#[test]
fn a_report_too_large_for_a_frame_is_cut_to_fit_with_its_counts_whole() {
    let finding = |i: u64| Finding {
        offset: i * 4096,
        what: Damaged::OlderSlot { page: i },
        error: "é".repeat(200),
        repaired: false,
    };
    let area = |pg: u32| {
        (
            Area::Segment(SegmentId { volume: 1, pg }),
            AreaReport {
                blocks_checked: 1,
                pages_checked: 1,
                found: 1000,
                repaired: 0,
                left: (0..LEFT_LISTED_MAX as u64).map(finding).collect(),
            },
        )
    };
    let mut s = Status {
        last: Some(PassReport {
            pass: 1,
            areas: (0..SCRUB_SEGMENTS_MAX as u32)
                .map(area)
                .chain([(Area::Log, AreaReport::default())])
                .collect(),
            ..PassReport::default()
        }),
        ..Status::default()
    };
    assert!(encode_frame(1, &Message::ScrubStatusOk { status: s.clone() }, &mut Vec::new()).is_err());
    fit_status_for_wire(&mut s);
    let msg = Message::ScrubStatusOk { status: s.clone() };
    let frame = encode(1, &msg);
    assert!(frame.len() <= FRAME_BYTES_MAX);
    assert_eq!(decode(&frame).unwrap().unwrap().0.message, msg);
    let areas = &s.last.as_ref().unwrap().areas;
    assert_eq!(areas.len(), SCRUB_AREAS_MAX);
    let (_, first) = &areas[0];
    assert_eq!(first.found, 1000, "the counts are whole");
    assert!(!first.left.is_empty() && first.left.len() < LEFT_LISTED_MAX);
    // Texts cut at a character boundary, to the limit at most.
    assert!(first.left[0].error.len() <= FINDING_ERROR_BYTES_MAX);
    assert_eq!(first.left[0].error, "é".repeat(FINDING_ERROR_BYTES_MAX / 2));
}

mod garbage {
    use super::*;
    use crate::proto::tests::strategies::arb_scrub_status;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Random bodies of the scrub types: refused or decoded, never a panic.
        #[test]
        fn random_scrub_bodies_never_panic(kind in 25u8..=30, body in prop::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(&raw_frame(1, kind, 0, 1, &body));
        }

        /// A report with bytes changed is refused, or is a report whose own
        /// encoding is exactly those bytes: one encoding per report.
        #[test]
        fn a_changed_report_is_refused_or_encodes_to_the_same_bytes(
            status in arb_scrub_status(),
            changes in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        ) {
            let mut body = body_of(&Message::ScrubStatusOk { status });
            for (at, byte) in changes {
                let at = at.index(body.len());
                body[at] = byte;
            }
            if let Ok(msg) = decode_body(MessageType::ScrubStatusOk, &body) {
                prop_assert_eq!(body_of(&msg), body);
            }
        }
    }
}
