//! The S3 backend against real servers on loopback: the conformance suite on Garage and on
//! moto (with versioning), SSE-C checked by Garage, TLS with a CA bundle, and cleanup of
//! stale multipart uploads.

mod common;
#[path = "common/s3.rs"]
mod s3;
#[path = "common/store_suite.rs"]
mod store_suite;

use std::sync::Arc;

use bytes::Bytes;
use coffer::store::s3::{S3Location, S3Options, S3Store};
use coffer::store::{
    CopyOptions, GetOptions, ObjectStore, PutOptions, Sse, SseCustomerKey, StoreError,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_on_garage() {
    let store = s3::garage().store("conformance").await;
    store_suite::run_all(Arc::new(store.clone()), "").await;
    let stats = store.request_stats();
    assert!(
        stats.iter().any(|(k, v)| *k == "put" && *v > 0),
        "{stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_with_versions_on_moto() {
    let store = s3::moto().store("conformance").await;
    assert!(store.versioning_enabled().await.unwrap());
    store_suite::run_all(Arc::new(store), "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garage_has_no_versioning_and_says_so() {
    let store = s3::garage().store("noversions").await;
    assert!(!store.versioning_enabled().await.unwrap());
}

fn sse_c(byte: u8) -> Sse {
    Sse::Customer(SseCustomerKey::new([byte; 32]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garage_checks_sse_c_keys() {
    let s = s3::garage().store("ssec").await;
    let put = PutOptions {
        sse: sse_c(7),
        ..Default::default()
    };
    s.put("secret", Bytes::from_static(b"plain words"), &put)
        .await
        .unwrap();
    let with = |sse: Sse| GetOptions {
        sse,
        version_id: None,
        if_match: None,
    };
    let got = s.get("secret", None, &with(sse_c(7))).await.unwrap();
    assert_eq!(&got.body[..], b"plain words");
    for (what, sse) in [("no key", Sse::None), ("a wrong key", sse_c(8))] {
        let e = s.get("secret", None, &with(sse.clone())).await.unwrap_err();
        assert!(
            matches!(e, StoreError::WrongKey { .. }),
            "get with {what}: {e:?}"
        );
        assert_eq!(e.errno(), libc::EACCES);
        let e = s.head("secret", &with(sse)).await.unwrap_err();
        assert!(
            matches!(e, StoreError::WrongKey { .. }),
            "head with {what}: {e:?}"
        );
    }
    // A copy re-encrypts from one customer key to another on the server.
    s.copy(
        "secret",
        "secret2",
        &CopyOptions {
            source_sse: sse_c(7),
            sse: sse_c(9),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let got = s.get("secret2", None, &with(sse_c(9))).await.unwrap();
    assert_eq!(&got.body[..], b"plain words");
    assert!(s.get("secret2", None, &with(sse_c(7))).await.is_err());
    // Multipart with SSE-C.
    let mut up = s.create_upload("big", &put).await.unwrap();
    up.put_part(Bytes::from(vec![1u8; 5 << 20])).await.unwrap();
    up.put_part(Bytes::from(vec![2u8; 1000])).await.unwrap();
    up.complete().await.unwrap();
    let got = s
        .get("big", Some((5 << 20) - 2..(5 << 20) + 2), &with(sse_c(7)))
        .await
        .unwrap();
    assert_eq!(&got.body[..], &[1, 1, 2, 2]);
    assert!(s.get("big", Some(0..10), &with(Sse::None)).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_multipart_uploads_are_aborted() {
    let s = s3::garage().store("gc").await;
    let mut up = s
        .create_upload("left", &PutOptions::default())
        .await
        .unwrap();
    up.put_part(Bytes::from(vec![3u8; 5 << 20])).await.unwrap();
    // A writer that crashed: the upload is never completed nor aborted.
    std::mem::forget(up);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let n = s
        .abort_stale_uploads(std::time::Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(n, 1);
    assert_eq!(
        s.abort_stale_uploads(std::time::Duration::ZERO)
            .await
            .unwrap(),
        0
    );
    assert!(matches!(
        s.head("left", &GetOptions::default()).await,
        Err(StoreError::NotFound { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_needs_the_ca_bundle() {
    let server = s3::moto_tls();
    let s = server.store("tls").await;
    s.put(
        "hello",
        Bytes::from_static(b"over tls"),
        &PutOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        &s.get("hello", None, &GetOptions::default())
            .await
            .unwrap()
            .body[..],
        b"over tls"
    );
    // Without the bundle the server's certificate is not trusted, and the error says so.
    let opts = S3Options {
        endpoint_url: Some(server.endpoint.clone()),
        region: Some(server.region.clone()),
        path_style: true,
        max_attempts: 2,
        static_credentials: Some((server.access_key.clone(), server.secret_key.clone())),
        ..Default::default()
    };
    let loc = S3Location::parse(&format!("s3://{}/tls", server.bucket)).unwrap();
    let untrusting = S3Store::connect(loc, &opts).await.unwrap();
    let e = untrusting
        .get("hello", None, &GetOptions::default())
        .await
        .unwrap_err();
    let text = e.to_string().to_ascii_lowercase();
    assert!(
        text.contains("certificate") || text.contains("unknownissuer"),
        "{e}"
    );
    assert_eq!(e.errno(), libc::EIO);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_pinned_to_an_etag_never_mix_versions() {
    let s = s3::garage().store("ifmatch").await;
    let first = s
        .put("doc", Bytes::from(vec![1u8; 1000]), &PutOptions::default())
        .await
        .unwrap();
    let pinned = GetOptions {
        if_match: Some(first.etag.clone()),
        ..Default::default()
    };
    assert_eq!(
        s.get("doc", Some(0..10), &pinned).await.unwrap().body[..],
        [1u8; 10]
    );
    s.put("doc", Bytes::from(vec![2u8; 1000]), &PutOptions::default())
        .await
        .unwrap();
    let e = s.get("doc", Some(10..20), &pinned).await.unwrap_err();
    assert!(matches!(e, StoreError::Changed { .. }), "{e:?}");
    assert_eq!(e.errno(), libc::EIO);
}
