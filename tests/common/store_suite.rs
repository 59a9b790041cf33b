//! The conformance suite every `ObjectStore` backend passes: the same calls and expected
//! answers against memory, local and (later) S3 stores.

use std::sync::Arc;

use bytes::Bytes;
use coffer::store::{
    Checksum, CopyOptions, GetOptions, ListRequest, Metadata, ObjectStore, PutOptions, StoreError,
    keys_of, list_all,
};

fn meta(pairs: &[(&str, &str)]) -> Metadata {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn opts(pairs: &[(&str, &str)]) -> PutOptions {
    PutOptions {
        metadata: meta(pairs),
        ..Default::default()
    }
}

/// Runs every conformance check under `prefix` (so several runs can share a bucket).
pub async fn run_all(store: Arc<dyn ObjectStore>, prefix: &str) {
    put_get_head(&*store, prefix).await;
    ranged_gets(&*store, prefix).await;
    listings(&*store, prefix).await;
    pagination(&*store, prefix).await;
    delete_and_copy(&*store, prefix).await;
    rename(&*store, prefix).await;
    multipart(&*store, prefix).await;
    checksums_and_limits(&*store, prefix).await;
    if store.versioning_enabled().await.unwrap() {
        versions(&*store, prefix).await;
    }
}

async fn put_get_head(s: &dyn ObjectStore, p: &str) {
    let k = format!("{p}a/file.txt");
    let info = s
        .put(
            &k,
            Bytes::from_static(b"hello"),
            &opts(&[("mode", "33188")]),
        )
        .await
        .unwrap();
    assert_eq!(info.size, 5);
    let got = s.get(&k, None, &GetOptions::default()).await.unwrap();
    assert_eq!(&got.body[..], b"hello");
    assert_eq!(
        got.info.metadata.as_ref().unwrap().get("mode").unwrap(),
        "33188"
    );
    let head = s.head(&k, &GetOptions::default()).await.unwrap();
    assert_eq!((head.size, head.etag.clone()), (5, info.etag.clone()));
    // Overwrite replaces body and metadata.
    s.put(&k, Bytes::from_static(b"bye"), &opts(&[]))
        .await
        .unwrap();
    let got = s.get(&k, None, &GetOptions::default()).await.unwrap();
    assert_eq!(&got.body[..], b"bye");
    assert!(!got.info.metadata.unwrap().contains_key("mode"));
    // Missing keys.
    let missing = format!("{p}nope");
    assert!(matches!(
        s.get(&missing, None, &GetOptions::default()).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        s.head(&missing, &GetOptions::default()).await,
        Err(StoreError::NotFound { .. })
    ));
    // Empty objects and odd keys.
    for key in [
        format!("{p}empty"),
        format!("{p}dir/"),
        format!("{p}sp ace/ünï"),
        format!("{p}.hidden/%v"),
    ] {
        s.put(&key, Bytes::new(), &opts(&[])).await.unwrap();
        assert_eq!(
            s.get(&key, None, &GetOptions::default())
                .await
                .unwrap()
                .body
                .len(),
            0,
            "{key}"
        );
    }
}

async fn ranged_gets(s: &dyn ObjectStore, p: &str) {
    let k = format!("{p}ranged");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7) as u8).collect();
    s.put(&k, Bytes::from(data.clone()), &opts(&[]))
        .await
        .unwrap();
    for (a, b) in [
        (0, 1),
        (0, 65536),
        (65535, 65537),
        (100_000, 250_000),
        (299_999, 300_000),
        (10, 10),
    ] {
        let got = s.get(&k, Some(a..b), &GetOptions::default()).await.unwrap();
        assert_eq!(got.range, a..b);
        assert_eq!(&got.body[..], &data[a as usize..b as usize], "{a}..{b}");
    }
    // Past the end is cut at the end.
    let got = s
        .get(&k, Some(299_000..400_000), &GetOptions::default())
        .await
        .unwrap();
    assert_eq!(&got.body[..], &data[299_000..]);
}

async fn listings(s: &dyn ObjectStore, p: &str) {
    let base = format!("{p}list/");
    for k in ["a", "b/1", "b/2", "b/c/3", "c/", "d-x", "d/y"] {
        s.put(&format!("{base}{k}"), Bytes::from_static(b"x"), &opts(&[]))
            .await
            .unwrap();
    }
    let page = list_all(
        s,
        ListRequest {
            prefix: base.clone(),
            delimiter: Some('/'),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let rel = |v: Vec<String>| {
        v.into_iter()
            .map(|k| k[base.len()..].to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(rel(keys_of(&page)), vec!["a", "d-x"]);
    assert_eq!(rel(page.common_prefixes.clone()), vec!["b/", "c/", "d/"]);
    assert!(page.objects.iter().all(|o| o.size == 1));
    let page = list_all(
        s,
        ListRequest {
            prefix: format!("{base}b/"),
            delimiter: Some('/'),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(rel(keys_of(&page)), vec!["b/1", "b/2"]);
    assert_eq!(rel(page.common_prefixes), vec!["b/c/"]);
    // The marker of a prefix is listed under it.
    let page = list_all(
        s,
        ListRequest {
            prefix: format!("{base}c/"),
            delimiter: Some('/'),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(rel(keys_of(&page)), vec!["c/"]);
    // A partial last component.
    let page = list_all(
        s,
        ListRequest {
            prefix: format!("{base}d"),
            delimiter: Some('/'),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(rel(keys_of(&page)), vec!["d-x"]);
    assert_eq!(rel(page.common_prefixes), vec!["d/"]);
    // Without a delimiter: every key, in order.
    let page = list_all(
        s,
        ListRequest {
            prefix: base.clone(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        rel(keys_of(&page)),
        vec!["a", "b/1", "b/2", "b/c/3", "c/", "d-x", "d/y"]
    );
}

async fn pagination(s: &dyn ObjectStore, p: &str) {
    let base = format!("{p}page/");
    let mut want = Vec::new();
    for i in 0..25 {
        let k = format!("{base}k{i:03}");
        s.put(&k, Bytes::from_static(b"x"), &opts(&[]))
            .await
            .unwrap();
        want.push(k);
    }
    for i in 0..3 {
        s.put(
            &format!("{base}sub{i}/x"),
            Bytes::from_static(b"x"),
            &opts(&[]),
        )
        .await
        .unwrap();
    }
    let mut req = ListRequest {
        prefix: base.clone(),
        delimiter: Some('/'),
        max_keys: 7,
        ..Default::default()
    };
    let mut keys = Vec::new();
    let mut prefixes = Vec::new();
    let mut pages = 0;
    loop {
        let page = s.list(&req).await.unwrap();
        pages += 1;
        assert!(page.objects.len() + page.common_prefixes.len() <= 7);
        keys.extend(keys_of(&page));
        prefixes.extend(page.common_prefixes);
        match page.next {
            Some(t) => req.continuation = Some(t),
            None => break,
        }
    }
    assert_eq!(keys, want);
    assert_eq!(prefixes.len(), 3);
    assert_eq!(pages, 4);
}

async fn delete_and_copy(s: &dyn ObjectStore, p: &str) {
    let k = format!("{p}del/x");
    s.put(&k, Bytes::from_static(b"1"), &opts(&[("a", "1")]))
        .await
        .unwrap();
    s.delete(&k).await.unwrap();
    assert!(matches!(
        s.head(&k, &GetOptions::default()).await,
        Err(StoreError::NotFound { .. })
    ));
    s.delete(&k).await.unwrap(); // deleting a missing key succeeds
    let page = list_all(
        s,
        ListRequest {
            prefix: format!("{p}del/"),
            delimiter: Some('/'),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(
        page.objects.is_empty() && page.common_prefixes.is_empty(),
        "{page:?}"
    );

    let src = format!("{p}copy/src");
    let dst = format!("{p}copy/dst");
    s.put(&src, Bytes::from_static(b"payload"), &opts(&[("a", "1")]))
        .await
        .unwrap();
    s.copy(&src, &dst, &CopyOptions::default()).await.unwrap();
    let got = s.get(&dst, None, &GetOptions::default()).await.unwrap();
    assert_eq!(&got.body[..], b"payload");
    assert_eq!(got.info.metadata.unwrap().get("a").unwrap(), "1");
    // Metadata replace in place: same body, new metadata.
    let replace = CopyOptions {
        metadata: Some(meta(&[("b", "2")])),
        ..Default::default()
    };
    s.copy(&src, &src, &replace).await.unwrap();
    let got = s.get(&src, None, &GetOptions::default()).await.unwrap();
    assert_eq!(&got.body[..], b"payload");
    assert_eq!(got.info.metadata.unwrap(), meta(&[("b", "2")]));
    // A copy that requires an ETag the source does not have is refused and changes nothing;
    // with the source's own ETag (sent to the server as x-amz-copy-source-if-match) it runs.
    let stale = CopyOptions {
        metadata: Some(meta(&[("c", "3")])),
        source_if_match: Some("0123456789abcdef0123456789abcdef".into()),
        ..Default::default()
    };
    assert!(matches!(
        s.copy(&src, &src, &stale).await,
        Err(StoreError::PreconditionFailed { .. })
    ));
    let head = s.head(&src, &GetOptions::default()).await.unwrap();
    assert_eq!(head.metadata.unwrap(), meta(&[("b", "2")]));
    let current = CopyOptions {
        source_if_match: Some(head.etag),
        ..stale
    };
    s.copy(&src, &src, &current).await.unwrap();
    let got = s.get(&src, None, &GetOptions::default()).await.unwrap();
    assert_eq!(&got.body[..], b"payload");
    assert_eq!(got.info.metadata.unwrap(), meta(&[("c", "3")]));
    assert!(matches!(
        s.copy(&format!("{p}copy/missing"), &dst, &CopyOptions::default())
            .await,
        Err(StoreError::NotFound { .. })
    ));
}

async fn rename(s: &dyn ObjectStore, p: &str) {
    let get = |k: String| async move { s.get(&k, None, &GetOptions::default()).await };
    let (a, b) = (format!("{p}ren/a"), format!("{p}ren/b"));
    s.put(&a, Bytes::from_static(b"first"), &opts(&[("x", "1")]))
        .await
        .unwrap();
    let moved = CopyOptions {
        metadata: Some(meta(&[("x", "2")])),
        ..Default::default()
    };
    let info = s.rename(&a, &b, &moved).await.unwrap();
    assert_eq!(info.size, 5);
    let got = get(b.clone()).await.unwrap();
    assert_eq!(&got.body[..], b"first");
    assert_eq!(got.info.metadata.unwrap(), meta(&[("x", "2")]));
    assert!(matches!(
        get(a.clone()).await,
        Err(StoreError::NotFound { .. })
    ));
    // Onto an existing key: replaced.
    s.put(&a, Bytes::from_static(b"second"), &opts(&[]))
        .await
        .unwrap();
    s.rename(&a, &b, &CopyOptions::default()).await.unwrap();
    assert_eq!(&get(b.clone()).await.unwrap().body[..], b"second");
    assert!(matches!(
        get(a.clone()).await,
        Err(StoreError::NotFound { .. })
    ));
    // A missing source changes nothing.
    assert!(matches!(
        s.rename(&a, &b, &CopyOptions::default()).await,
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(&get(b.clone()).await.unwrap().body[..], b"second");
    // Onto itself: still there, with the new metadata.
    s.rename(&b, &b, &moved).await.unwrap();
    let got = get(b.clone()).await.unwrap();
    assert_eq!(&got.body[..], b"second");
    assert_eq!(got.info.metadata.unwrap(), meta(&[("x", "2")]));
    let keys = keys_of(
        &list_all(
            s,
            ListRequest {
                prefix: format!("{p}ren/"),
                ..Default::default()
            },
        )
        .await
        .unwrap(),
    );
    assert_eq!(keys, vec![b], "only the renamed key is listed");
}

async fn multipart(s: &dyn ObjectStore, p: &str) {
    let k = format!("{p}multi");
    let min = s.limits().min_part_size.max(1) as usize;
    let parts: Vec<Vec<u8>> = (0..3u8)
        .map(|i| vec![i + 1; if i < 2 { min.max(100_000) } else { 1234 }])
        .collect();
    let mut up = s.create_upload(&k, &opts(&[("m", "v")])).await.unwrap();
    for part in &parts {
        up.put_part(Bytes::from(part.clone())).await.unwrap();
        // Nothing visible before completion.
        assert!(matches!(
            s.head(&k, &GetOptions::default()).await,
            Err(StoreError::NotFound { .. })
        ));
    }
    let info = up.complete().await.unwrap();
    assert_eq!(
        info.size as usize,
        parts.iter().map(Vec::len).sum::<usize>()
    );
    let got = s.get(&k, None, &GetOptions::default()).await.unwrap();
    assert_eq!(&got.body[..], &parts.concat()[..]);
    assert_eq!(got.info.metadata.unwrap().get("m").unwrap(), "v");
    // An aborted upload leaves the previous object.
    let mut up = s.create_upload(&k, &opts(&[])).await.unwrap();
    up.put_part(Bytes::from(vec![9u8; min.max(10)]))
        .await
        .unwrap();
    up.abort().await.unwrap();
    let got = s.get(&k, None, &GetOptions::default()).await.unwrap();
    assert_eq!(&got.body[..], &parts.concat()[..]);
}

async fn checksums_and_limits(s: &dyn ObjectStore, p: &str) {
    let k = format!("{p}sum");
    let good = PutOptions {
        checksum: Some(Checksum::crc32c_of(b"abc")),
        ..Default::default()
    };
    s.put(&k, Bytes::from_static(b"abc"), &good).await.unwrap();
    let bad = PutOptions {
        checksum: Some(Checksum::crc32c_of(b"abd")),
        ..Default::default()
    };
    assert!(s.put(&k, Bytes::from_static(b"abc"), &bad).await.is_err());
    assert_eq!(
        &s.get(&k, None, &GetOptions::default()).await.unwrap().body[..],
        b"abc"
    );
    let huge = opts(&[("big", &"x".repeat(3000))]);
    assert!(
        s.put(&format!("{p}huge-meta"), Bytes::new(), &huge)
            .await
            .is_err()
    );
}

async fn versions(s: &dyn ObjectStore, p: &str) {
    let k = format!("{p}ver/doc");
    for body in ["v1", "v2", "v3", "v4"] {
        s.put(&k, Bytes::from(body), &opts(&[])).await.unwrap();
    }
    s.delete(&k).await.unwrap();
    let list = s.list_versions(&k).await.unwrap();
    assert_eq!(list.len(), 5, "{list:?}");
    assert!(list[0].is_delete_marker && list[0].is_latest);
    assert_eq!(list.iter().filter(|v| !v.is_delete_marker).count(), 4);
    // Newest first: list[3] is the second version written.
    let second = &list[3];
    let got = s
        .get(
            &k,
            None,
            &GetOptions {
                version_id: Some(second.version_id.clone()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(&got.body[..], b"v2");
    s.restore_version(&k, &second.version_id, &Default::default())
        .await
        .unwrap();
    assert_eq!(
        &s.get(&k, None, &GetOptions::default()).await.unwrap().body[..],
        b"v2"
    );
    assert_eq!(s.list_versions(&k).await.unwrap().len(), 6);
}
