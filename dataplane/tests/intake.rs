//! What a request may arrive as (issue #33): a gzip or deflate body,
//! decoded within the body limit (a bomb is a 413), and a browser page's
//! calls, answered with CORS headers only for the origins the operator
//! listed.

use aex_tests::Stack;
use reqwest::{Client, StatusCode};
use serde_json::Value;
use std::io::Write;

mod common;
use common::*;

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

async fn send(stack: &Stack, token: &str, encoding: &str, body: Vec<u8>) -> reqwest::Response {
    Client::new()
        .post(stack.url("/v1/chat/completions"))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .header("content-encoding", encoding)
        .body(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn compressed_bodies_are_decoded_within_the_limit() {
    let stack = Stack::start_with(&["--max-body-bytes", "1048576"]).await;
    let token = stack.agent("zipped", "1", "600", &[]);
    let body = serde_json::to_vec(&chat("mock-model")).unwrap();

    let r = send(&stack, &token, "gzip", gzip(&body)).await;
    assert_eq!(r.status(), StatusCode::OK);
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    z.write_all(&body).unwrap();
    let r = send(&stack, &token, "deflate", z.finish().unwrap()).await;
    assert_eq!(r.status(), StatusCode::OK);
    // The provider got the JSON, not the compressed bytes.
    let seen = stack.mock.requests();
    assert_eq!(seen.len(), 2);
    for request in &seen {
        assert_eq!(request.body["messages"][0]["content"], "hello there");
    }

    // 100:1 — 20 KiB that decode to 2 MiB of JSON, past the 1 MiB limit.
    let padding = " ".repeat(2 << 20);
    let bomb_json = format!(
        r#"{{"model":"mock-model","messages":[{{"role":"user","content":"hi"}}]{padding}}}"#
    );
    let bomb = gzip(bomb_json.as_bytes());
    assert!(bomb.len() * 100 < bomb_json.len(), "{} bytes", bomb.len());
    let r = send(&stack, &token, "gzip", bomb).await;
    let e = error_of(r, 413, "request_too_large").await;
    assert!(
        e["message"].as_str().unwrap().contains("decompressed"),
        "{e}"
    );

    let r = send(&stack, &token, "gzip", body.clone()).await;
    let e = error_of(r, 400, "invalid_request").await;
    assert!(
        e["message"].as_str().unwrap().contains("not valid gzip"),
        "{e}"
    );
    let r = send(&stack, &token, "br", body).await;
    let e = error_of(r, 415, "unsupported_content_encoding").await;
    assert!(e["message"].as_str().unwrap().contains("'br'"), "{e}");
    assert_eq!(
        stack.mock.requests().len(),
        2,
        "no refused body went upstream"
    );
}

#[tokio::test]
async fn only_listed_origins_get_cors_answers() {
    let listed = "http://localhost:5173";
    let stack = Stack::start_with(&[
        "--cors-origins",
        "http://localhost:5173,https://agents.example",
    ])
    .await;
    let token = stack.agent("browser", "1", "600", &[]);
    let preflight = |origin: &'static str| {
        Client::new()
            .request(reqwest::Method::OPTIONS, stack.url("/v1/chat/completions"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type, x-stainless-os",
            )
            .send()
    };
    let r = preflight(listed).await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(header(&r, "access-control-allow-origin"), Some(listed));
    assert_eq!(
        header(&r, "access-control-allow-headers"),
        Some("authorization, content-type, x-stainless-os")
    );
    assert!(
        header(&r, "access-control-allow-methods")
            .unwrap()
            .contains("POST")
    );
    assert_eq!(header(&r, "access-control-allow-credentials"), None);

    let r = preflight("https://evil.example").await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(
        r.headers()
            .keys()
            .all(|k| !k.as_str().starts_with("access-control-"))
    );
    let e = error_of(r, 403, "cors_origin_not_allowed").await;
    assert!(
        e["message"].as_str().unwrap().contains("--cors-origins"),
        "{e}"
    );

    // The calls themselves: a listed origin reads the answer and AEX's
    // headers, errors included; another gets no CORS header at all.
    let call = |origin: &'static str, token: &str| {
        Client::new()
            .post(stack.url("/v1/chat/completions"))
            .bearer_auth(token)
            .header("origin", origin)
            .json(&chat("mock-model"))
            .send()
    };
    let r = call(listed, &token).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "access-control-allow-origin"), Some(listed));
    assert!(
        header(&r, "access-control-expose-headers")
            .unwrap()
            .contains("x-aex-request-id")
    );
    let r = call(listed, "aex_not_a_token").await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(header(&r, "access-control-allow-origin"), Some(listed));
    let r = call("https://evil.example", &token).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        r.headers()
            .keys()
            .all(|k| !k.as_str().starts_with("access-control-"))
    );
}

#[tokio::test]
async fn without_a_list_no_origin_is_answered() {
    let stack = Stack::start().await;
    let r = Client::new()
        .request(reqwest::Method::OPTIONS, stack.url("/v1/messages"))
        .header("origin", "http://localhost:5173")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(
        r.headers()
            .keys()
            .all(|k| !k.as_str().starts_with("access-control-"))
    );
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("CORS is off"),
        "{v}"
    );
}
