//! Hand-built frames for each check a receiver makes, and what the encoder refuses.

use super::{decode, encode, raw_frame, record, u64s};
use crate::proto::*;
use crate::record::{RecordError, RedoRecord, WireRecord};

// --- frame envelope --------------------------------------------------------

#[test]
fn length_below_the_header_is_refused() {
    for length in 0..FRAME_LENGTH_MIN as u32 {
        assert_eq!(decode(&length.to_le_bytes()), Err(ProtoError::FrameTooSmall { length }));
    }
}

#[test]
fn header_fields_are_checked() {
    let body = u64s(&[1]);
    let ack = [body.clone(), 2u32.to_le_bytes().to_vec(), u64s(&[3, 4])].concat();
    assert!(decode(&raw_frame(1, 4, 0, 1, &ack)).unwrap().is_some());

    let err = decode(&raw_frame(2, 4, 0, 1, &ack)).unwrap_err();
    assert_eq!(err, ProtoError::UnsupportedVersion(2));
    assert_eq!(err.error_code(), ErrorCode::UnsupportedVersion);
    // The version is judged as soon as its byte arrives.
    assert_eq!(
        decode(&raw_frame(2, 4, 0, 1, &ack)[..5]),
        Err(ProtoError::UnsupportedVersion(2))
    );
    assert_eq!(decode(&raw_frame(1, 4, 0x10, 1, &ack)), Err(ProtoError::BadFlags(0x10)));
    assert_eq!(
        decode(&raw_frame(1, 42, 0, 1, &ack)),
        Err(ProtoError::UnknownMessageType(42))
    );

    let mut bad = raw_frame(1, 4, 0, 1, &ack);
    let stored = u32::from_le_bytes([bad[16], bad[17], bad[18], bad[19]]);
    bad[25] ^= 1;
    let computed = crc32c::crc32c_append(crc32c::crc32c(&bad[4..16]), &bad[20..]);
    assert_eq!(decode(&bad), Err(ProtoError::BadCrc { stored, computed }));
}

#[test]
fn a_lower_configured_max_is_honoured() {
    let msg = Message::Page {
        volume: 1,
        pg: 2,
        page: 3,
        lsn: 4,
        bytes: vec![0; 1000],
    };
    let buf = encode(1, &msg);
    assert_eq!(
        decode_frame(&buf[..4], 512),
        Err(ProtoError::FrameTooLarge {
            frame_bytes: buf.len(),
            frame_bytes_max: 512
        })
    );
    assert!(decode_frame(&buf, buf.len()).unwrap().is_some());
}

#[test]
fn decoder_stays_failed_and_stops_buffering() {
    let mut decoder = FrameDecoder::new(FRAME_BYTES_MAX);
    decoder.push(&3u32.to_le_bytes());
    let first = decoder.next().unwrap_err();
    decoder.push(&encode(1, &Message::error(ErrorCode::Internal, 0, "x")));
    assert_eq!(decoder.next().unwrap_err(), first);
    assert_eq!(decoder.buffered_bytes(), 4);
}

// --- bodies ----------------------------------------------------------------

#[test]
fn a_huge_record_count_is_refused_before_allocating() {
    // 2^31 records declared in a 44-byte body: sizing a Vec from the count
    // would ask for ~200 GiB; the decoder must refuse from the body size.
    let body = [
        u64s(&[1, 1]),
        2u32.to_le_bytes().to_vec(),
        8192u32.to_le_bytes().to_vec(),
        u64s(&[1024, 2]),
        (1u32 << 31).to_le_bytes().to_vec(),
    ]
    .concat();
    assert_eq!(
        decode(&raw_frame(1, MessageType::Append as u8, 0, 1, &body)),
        Err(ProtoError::RecordCountImpossible {
            declared: 1 << 31,
            room: 0
        })
    );
}

#[test]
fn huge_declared_lengths_are_refused() {
    let page = [
        u64s(&[1]),
        2u32.to_le_bytes().to_vec(),
        u64s(&[3, 4]),
        u32::MAX.to_le_bytes().to_vec(),
    ]
    .concat();
    let err = decode(&raw_frame(1, MessageType::Page as u8, 0, 1, &page)).unwrap_err();
    assert!(matches!(
        err,
        ProtoError::BodyTooShort {
            kind: MessageType::Page,
            ..
        }
    ));

    let error = [u64s(&[0]), 7u16.to_le_bytes().to_vec(), u16::MAX.to_le_bytes().to_vec()].concat();
    assert_eq!(
        decode(&raw_frame(1, MessageType::Error as u8, 0, 1, &error)),
        Err(ProtoError::MessageTooLong(u16::MAX as usize))
    );
}

fn append_body(volume: u64, pg: u32, count: u32, records: &[RedoRecord]) -> Vec<u8> {
    let mut body = [
        u64s(&[volume, 9]),
        pg.to_le_bytes().to_vec(),
        8192u32.to_le_bytes().to_vec(),
        u64s(&[1024, 2]),
        count.to_le_bytes().to_vec(),
    ]
    .concat();
    for r in records {
        r.encode_into(&mut body);
    }
    body
}

fn decode_append(body: &[u8]) -> Result<Option<(Frame, usize)>, ProtoError> {
    decode(&raw_frame(1, MessageType::Append as u8, 0, 1, body))
}

#[test]
fn batch_rules_are_enforced_on_decode() {
    let (a, b) = (record(1, 2, 10, vec![1; 8]), record(1, 2, 11, vec![]));
    assert!(decode_append(&append_body(1, 2, 2, &[a.clone(), b.clone()])).is_ok());

    assert_eq!(decode_append(&append_body(1, 2, 0, &[])), Err(ProtoError::EmptyBatch));
    assert_eq!(
        decode_append(&append_body(1, 2, 2, &[b.clone(), a.clone()])),
        Err(ProtoError::LsnNotIncreasing {
            index: 1,
            prev: 11,
            lsn: 10
        })
    );
    assert_eq!(
        decode_append(&append_body(1, 2, 2, &[a.clone(), a.clone()])),
        Err(ProtoError::LsnNotIncreasing {
            index: 1,
            prev: 10,
            lsn: 10
        })
    );
    let foreign = record(1, 3, 11, vec![]);
    assert!(matches!(
        decode_append(&append_body(1, 2, 2, &[a.clone(), foreign])),
        Err(ProtoError::ForeignRecord { index: 1, .. })
    ));
    // Count above the records present: the missing one reads as truncated.
    let mut two_declared_one_sent = append_body(1, 2, 2, std::slice::from_ref(&a));
    two_declared_one_sent.extend_from_slice(&[0; 60]);
    assert!(matches!(
        decode_append(&two_declared_one_sent),
        Err(ProtoError::BadRecord { index: 1, .. })
    ));
    // Count below: the extra record is trailing bytes.
    assert!(matches!(
        decode_append(&append_body(1, 2, 1, &[a.clone(), b])),
        Err(ProtoError::BodyTooLong {
            kind: MessageType::Append,
            ..
        })
    ));
    let mut bad_kind = append_body(1, 2, 1, &[a]);
    bad_kind[44 + 12] = 9;
    assert_eq!(
        decode_append(&bad_kind),
        Err(ProtoError::BadRecord {
            index: 0,
            source: RecordError::UnknownKind(9)
        })
    );
}

#[test]
fn fixed_bodies_must_be_exact() {
    let ack = [u64s(&[1]), 2u32.to_le_bytes().to_vec(), u64s(&[3, 4])].concat();
    let kind = MessageType::AppendAck as u8;
    assert_eq!(
        decode(&raw_frame(1, kind, 0, 1, &ack[..27])),
        Err(ProtoError::BodyTooShort {
            kind: MessageType::AppendAck,
            have: 27,
            need: 28
        })
    );
    let long = [ack, vec![0]].concat();
    assert_eq!(
        decode(&raw_frame(1, kind, 0, 1, &long)),
        Err(ProtoError::BodyTooLong {
            kind: MessageType::AppendAck,
            have: 29,
            expected: 28
        })
    );
    let hello = [u64s(&[1]), 1u16.to_le_bytes().to_vec(), vec![4]].concat();
    assert_eq!(
        decode(&raw_frame(1, MessageType::Hello as u8, 0, 1, &hello)),
        Err(ProtoError::UnknownRole(4))
    );
}

#[test]
fn error_bodies_are_checked() {
    let body = |code: u16, text: &[u8]| {
        let mut b = [u64s(&[0]), code.to_le_bytes().to_vec()].concat();
        b.extend_from_slice(&(text.len() as u16).to_le_bytes());
        b.extend_from_slice(text);
        raw_frame(1, MessageType::Error as u8, 0, 1, &b)
    };
    assert!(decode(&body(3, "stale".as_bytes())).unwrap().is_some());
    assert!(decode(&body(18, b"not held")).unwrap().is_some());
    assert_eq!(decode(&body(19, b"")), Err(ProtoError::UnknownErrorCode(19)));
    assert_eq!(decode(&body(0, b"")), Err(ProtoError::UnknownErrorCode(0)));
    assert_eq!(decode(&body(3, &[0xff, 0xfe])), Err(ProtoError::BadUtf8));
    assert_eq!(decode(&body(3, &[b'a'; 1025])), Err(ProtoError::MessageTooLong(1025)));
    assert!(decode(&body(3, &[b'a'; 1024])).unwrap().is_some());
}

// --- encoding --------------------------------------------------------------

#[test]
fn encode_refuses_what_a_peer_would_refuse() {
    let mut out = vec![0xAA];
    let cases = [
        (
            Message::Append {
                volume: 1,
                epoch: 1,
                pg: 2,
                page_bytes: 8192,
                pg_pages: 1024,
                membership_epoch: 0,
                records: vec![],
            },
            ProtoError::EmptyBatch,
        ),
        (
            Message::Error {
                code: ErrorCode::Internal,
                current_epoch: 0,
                message: "é".repeat(513),
            },
            ProtoError::MessageTooLong(1026),
        ),
        (
            Message::Page {
                volume: 1,
                pg: 2,
                page: 3,
                lsn: 4,
                bytes: vec![0; FRAME_BYTES_MAX],
            },
            ProtoError::FrameTooLarge {
                frame_bytes: FRAME_BYTES_MAX + 52,
                frame_bytes_max: FRAME_BYTES_MAX,
            },
        ),
    ];
    for (msg, want) in cases {
        assert_eq!(encode_frame(1, &msg, &mut out), Err(want));
        assert_eq!(out, [0xAA], "a refused frame leaves no bytes behind");
    }
    let bad_backlink = RedoRecord {
        prev_lsn_page: 10,
        ..record(1, 2, 10, vec![])
    };
    let msg = Message::Append {
        volume: 1,
        epoch: 1,
        pg: 2,
        page_bytes: 8192,
        pg_pages: 1024,
        membership_epoch: 0,
        records: vec![WireRecord::new(bad_backlink)],
    };
    assert!(matches!(
        encode_frame(1, &msg, &mut out),
        Err(ProtoError::BadRecord { index: 0, .. })
    ));
}

#[test]
fn error_constructor_cuts_at_a_char_boundary() {
    let Message::Error { message, .. } = Message::error(ErrorCode::Internal, 0, "é".repeat(600)) else {
        panic!("not an Error");
    };
    assert_eq!(message.len(), 1024);
    assert!(
        encode_frame(
            0,
            &Message::error(ErrorCode::BadFrame, 0, "x".repeat(5000)),
            &mut Vec::new()
        )
        .is_ok()
    );
}

#[test]
fn append_frames_from_encoded_records_are_what_encode_frame_makes() {
    let records: Vec<RedoRecord> = (1..4).map(|lsn| record(9, 2, lsn, vec![lsn as u8; 5])).collect();
    let encoded: Vec<Vec<u8>> = records.iter().map(RedoRecord::encode).collect();
    let slices: Vec<&[u8]> = encoded.iter().map(|e| e.as_slice()).collect();
    let header = crate::proto::AppendHeader {
        volume: 9,
        epoch: 4,
        pg: 2,
        page_bytes: 8192,
        pg_pages: 1024,
        membership_epoch: 3,
    };
    let mut ours = Vec::new();
    crate::proto::encode_append_frame(77, &header, &slices, &mut ours).unwrap();
    let msg = Message::Append {
        volume: 9,
        epoch: 4,
        pg: 2,
        page_bytes: 8192,
        pg_pages: 1024,
        membership_epoch: 3,
        records: records.into_iter().map(WireRecord::new).collect(),
    };
    let mut theirs = Vec::new();
    encode_frame(77, &msg, &mut theirs).unwrap();
    assert_eq!(ours, theirs);
    assert_eq!(decode(&ours).unwrap().unwrap().0.message, msg);
}

/// A `SegmentStatus` from a node that predates hole reporting ends after
/// its truncation ranges: it decodes with no holes. Holes are bounded and
/// checked like truncation ranges.
#[test]
fn segment_status_holes_are_optional_bounded_and_checked() {
    let head = [u64s(&[1]), 2u32.to_le_bytes().to_vec(), u64s(&[3; 10])].concat();
    let one_range = [1u32.to_le_bytes().to_vec(), u64s(&[5, 9])].concat();
    let kind = MessageType::SegmentStatus as u8;
    let old = [head.clone(), one_range.clone()].concat();
    let Ok(Some((frame, _))) = decode(&raw_frame(1, kind, 0, 1, &old)) else {
        panic!("an old status body is refused")
    };
    let Message::SegmentStatus { annulled, holes, .. } = frame.message else {
        panic!("{:?}", frame.message)
    };
    assert_eq!((annulled, holes), (vec![(5, 9)], vec![]));

    let holes = [2u32.to_le_bytes().to_vec(), u64s(&[10, 12, 20, u64::MAX])].concat();
    let new = [head.clone(), one_range.clone(), holes].concat();
    let Ok(Some((frame, _))) = decode(&raw_frame(1, kind, 0, 1, &new)) else {
        panic!("a status with holes is refused")
    };
    assert!(
        matches!(&frame.message, Message::SegmentStatus { holes, .. } if *holes == vec![(10, 12), (20, u64::MAX)]),
        "{:?}",
        frame.message
    );

    let too_many = [
        head.clone(),
        one_range.clone(),
        17u32.to_le_bytes().to_vec(),
        u64s(&[1; 34]),
    ]
    .concat();
    assert_eq!(
        decode(&raw_frame(1, kind, 0, 1, &too_many)),
        Err(ProtoError::TooManyHoles(17))
    );
    let empty = [head, one_range, 1u32.to_le_bytes().to_vec(), u64s(&[9, 8])].concat();
    assert_eq!(
        decode(&raw_frame(1, kind, 0, 1, &empty)),
        Err(ProtoError::BadRange { lo: 9, hi: 8 })
    );
}

/// A `SegmentStatus` from a node that predates damage reporting ends after
/// its holes: it decodes with no damage. The listed pages are bounded (by
/// the maximum and by the total) before they size anything.
#[test]
fn segment_status_damage_is_optional_bounded_and_checked() {
    let head = [u64s(&[1]), 2u32.to_le_bytes().to_vec(), u64s(&[3; 10])].concat();
    let no_ranges_no_holes = [0u32.to_le_bytes(), 0u32.to_le_bytes()].concat();
    let kind = MessageType::SegmentStatus as u8;
    let old = [head.clone(), no_ranges_no_holes.clone()].concat();
    let Ok(Some((frame, _))) = decode(&raw_frame(1, kind, 0, 1, &old)) else {
        panic!("a status body without damage is refused")
    };
    assert!(
        matches!(&frame.message, Message::SegmentStatus { damage, .. } if *damage == Damage::default()),
        "{:?}",
        frame.message
    );

    let tail = |total: u32, pages: &[u64], flags: u8| {
        [
            total.to_le_bytes().to_vec(),
            (pages.len() as u32).to_le_bytes().to_vec(),
            u64s(pages),
            vec![flags],
        ]
        .concat()
    };
    let new = [head.clone(), no_ranges_no_holes.clone(), tail(40, &[7, 9], 1)].concat();
    let Ok(Some((frame, _))) = decode(&raw_frame(1, kind, 0, 1, &new)) else {
        panic!("a status with damage is refused")
    };
    let want = Damage {
        pages_total: 40,
        pages: vec![7, 9],
        table_slot: true,
    };
    assert!(
        matches!(&frame.message, Message::SegmentStatus { damage, .. } if *damage == want),
        "{:?}",
        frame.message
    );
    assert_eq!(
        encode(1, &frame.message),
        raw_frame(1, kind, 0, 1, &new),
        "encodes back to the same bytes"
    );

    let too_many = [head.clone(), no_ranges_no_holes.clone(), tail(40, &[1; 17], 0)].concat();
    assert_eq!(
        decode(&raw_frame(1, kind, 0, 1, &too_many)),
        Err(ProtoError::BadDamagedPages { listed: 17, total: 40 })
    );
    let above_total = [head, no_ranges_no_holes, tail(1, &[1, 2], 0)].concat();
    assert_eq!(
        decode(&raw_frame(1, kind, 0, 1, &above_total)),
        Err(ProtoError::BadDamagedPages { listed: 2, total: 1 })
    );
}

/// A `SegmentStatus`'s hydration report follows the membership (all zeros
/// when the segment holds none): a body that ends before it has none, one
/// cut inside it is refused, and one with it encodes back to its bytes.
#[test]
fn segment_status_hydration_is_optional_after_the_membership() {
    let head = [u64s(&[1]), 2u32.to_le_bytes().to_vec(), u64s(&[3; 10])].concat();
    let no_ranges_no_holes_no_damage = [
        0u32.to_le_bytes(),
        0u32.to_le_bytes(),
        0u32.to_le_bytes(),
        0u32.to_le_bytes(),
    ]
    .concat()
    .into_iter()
    .chain([0u8])
    .collect::<Vec<u8>>();
    let no_membership = vec![0; crate::membership::MEMBERSHIP_BYTES];
    let kind = MessageType::SegmentStatus as u8;
    let hydration = [vec![1u8], u64s(&[8 << 20, 1024])].concat();
    let body = [
        head.clone(),
        no_ranges_no_holes_no_damage.clone(),
        no_membership.clone(),
        hydration.clone(),
    ]
    .concat();
    let Ok(Some((frame, _))) = decode(&raw_frame(1, kind, 0, 1, &body)) else {
        panic!("a status with a hydration report is refused")
    };
    let want = Hydration {
        under_way: true,
        bytes: 8 << 20,
        pages: 1024,
    };
    assert!(
        matches!(&frame.message, Message::SegmentStatus { membership: None, hydration: Some(h), .. } if *h == want),
        "{:?}",
        frame.message
    );
    assert_eq!(encode(1, &frame.message), raw_frame(1, kind, 0, 1, &body));

    let without = [
        head.clone(),
        no_ranges_no_holes_no_damage.clone(),
        no_membership.clone(),
    ]
    .concat();
    let Ok(Some((frame, _))) = decode(&raw_frame(1, kind, 0, 1, &without)) else {
        panic!("a status without a hydration report is refused")
    };
    assert!(matches!(&frame.message, Message::SegmentStatus { hydration: None, .. }));

    let cut = [
        head,
        no_ranges_no_holes_no_damage,
        no_membership,
        hydration[..9].to_vec(),
    ]
    .concat();
    assert!(matches!(
        decode(&raw_frame(1, kind, 0, 1, &cut)),
        Err(ProtoError::BodyTooShort { .. })
    ));
}

// --- gossip ----------------------------------------------------------------

fn six_members(epoch: u64) -> Membership {
    let members = (1..=6)
        .map(|id| crate::membership::Member {
            id,
            addr: std::net::SocketAddr::from(([127, 0, 0, 1], 7000 + id as u16)),
        })
        .collect();
    Membership::single(epoch, members)
}

fn set_membership_body(membership: &[u8]) -> Vec<u8> {
    [
        u64s(&[1, 2]),
        3u32.to_le_bytes().to_vec(),
        8192u32.to_le_bytes().to_vec(),
        u64s(&[64]),
        membership.to_vec(),
    ]
    .concat()
}

#[test]
fn a_set_membership_with_a_broken_membership_is_refused() {
    let mut good = Vec::new();
    six_members(1).encode(&mut good);
    let frame = raw_frame(1, MessageType::SetMembership as u8, 0, 1, &set_membership_body(&good));
    assert!(matches!(
        decode(&frame).unwrap().unwrap().0.message,
        Message::SetMembership { membership, .. } if membership == six_members(1)
    ));
    // The second member given the first one's id.
    let mut twice = good.clone();
    twice[9 + crate::membership::MEMBER_BYTES..9 + crate::membership::MEMBER_BYTES + 8]
        .copy_from_slice(&1u64.to_le_bytes());
    let err = decode(&raw_frame(
        1,
        MessageType::SetMembership as u8,
        0,
        1,
        &set_membership_body(&twice),
    ))
    .unwrap_err();
    assert_eq!(
        err,
        ProtoError::BadMembership(crate::membership::MembershipError::Duplicate(1))
    );
    assert_eq!(err.error_code(), ErrorCode::BadFrame);
    // All zeros is "none" in a status, and no membership to set.
    let zeros = vec![0; crate::membership::MEMBERSHIP_BYTES];
    assert!(matches!(
        decode(&raw_frame(
            1,
            MessageType::SetMembership as u8,
            0,
            1,
            &set_membership_body(&zeros)
        )),
        Err(ProtoError::BadMembership(_))
    ));
    // A byte short of the fixed encoding.
    assert!(matches!(
        decode(&raw_frame(
            1,
            MessageType::SetMembership as u8,
            0,
            1,
            &set_membership_body(&good[1..])
        )),
        Err(ProtoError::BodyTooShort { .. })
    ));
    // The encoder refuses to send one either.
    let mut broken = six_members(1);
    broken.old = 0b11;
    let msg = Message::SetMembership {
        volume: 1,
        epoch: 2,
        pg: 3,
        page_bytes: 8192,
        pg_pages: 64,
        membership: broken,
        annulled: Vec::new(),
    };
    assert!(matches!(
        encode_frame(1, &msg, &mut Vec::new()),
        Err(ProtoError::BadMembership(_))
    ));
}

#[test]
fn page_versions_declaring_more_versions_than_the_body_holds_are_refused_before_allocating() {
    let head = |count: u32| {
        [
            u64s(&[1]),
            2u32.to_le_bytes().to_vec(),
            u64s(&[3, 4]),
            count.to_le_bytes().to_vec(),
        ]
        .concat()
    };
    // 2^32 - 1 versions in a 32-byte body: no Vec is sized from the count.
    assert_eq!(
        decode(&raw_frame(1, MessageType::PageVersions as u8, 0, 1, &head(u32::MAX))),
        Err(ProtoError::RecordCountImpossible {
            declared: u32::MAX,
            room: 0
        })
    );
    // Two declared, one there (20-byte head and 8 bytes of page).
    let one = [u64s(&[5, 6]), 8u32.to_le_bytes().to_vec(), vec![7; 8]].concat();
    let body = [head(2), one.clone()].concat();
    assert_eq!(
        decode(&raw_frame(1, MessageType::PageVersions as u8, 0, 1, &body)),
        Err(ProtoError::RecordCountImpossible { declared: 2, room: 1 })
    );
    let body = [head(1), one].concat();
    match decode(&raw_frame(1, MessageType::PageVersions as u8, 0, 1, &body))
        .unwrap()
        .unwrap()
        .0
        .message
    {
        Message::PageVersions {
            floor: 3,
            next_page: 4,
            versions,
            ..
        } => {
            assert_eq!(
                versions,
                vec![WirePageVersion {
                    page: 5,
                    lsn: 6,
                    bytes: vec![7; 8]
                }]
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn gossip_request_bodies_are_exact() {
    let pull = Message::PullRecords {
        volume: 1,
        pg: 2,
        installed_epoch: 3,
        membership_epoch: 4,
        after: 5,
        max_bytes: 6,
    };
    let digest = Message::Digest {
        volume: 1,
        pg: 2,
        digest: GossipDigest {
            installed_epoch: 3,
            membership_epoch: 4,
            scl: 5,
            highest_lsn: 6,
            floor: 0,
        },
    };
    for (msg, body_bytes) in [(pull, 40), (digest, 52)] {
        let frame = encode(1, &msg);
        let body = &frame[20..];
        assert_eq!(body.len(), body_bytes, "{msg:?}");
        let kind = msg.kind() as u8;
        assert!(matches!(
            decode(&raw_frame(1, kind, 0, 1, &body[..body.len() - 1])),
            Err(ProtoError::BodyTooShort { .. })
        ));
        let long = [body, &[0]].concat();
        assert!(matches!(
            decode(&raw_frame(1, kind, 0, 1, &long)),
            Err(ProtoError::BodyTooLong { .. })
        ));
    }
}
