//! The bus over real Zenoh sessions on loopback: two sessions per test, a fresh port each,
//! multicast scouting off.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nanobot_actors::bus::{Bus, BusConfig, PubQos};
use nanobot_messages::{Event, EventKind, Kind, ReplayBatch, ReplayRequest, Tensor, TraceContext};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Two connected sessions: a listening node and a peer that connects to it.
async fn pair() -> (Bus, Bus) {
    let ep = format!("tcp/127.0.0.1:{}", free_port());
    let a = Bus::open(
        &BusConfig {
            listen: vec![ep.clone()],
            ..BusConfig::default()
        },
        "t",
    )
    .await
    .unwrap();
    let b = Bus::open(
        &BusConfig {
            connect: vec![ep],
            ..BusConfig::default()
        },
        "t",
    )
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.session().info().peers_zid().await.count() == 0 {
        assert!(Instant::now() < deadline, "sessions did not connect");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (a, b)
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn reward(v: f32) -> Event {
    Event {
        episode: 1,
        event: EventKind::Reward { value: v },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_only_keeps_the_newest_and_counts_the_replaced() {
    let (a, b) = pair().await;
    let sub = a.subscribe_latest::<Event>("t/r0/event", || {}).await.unwrap();
    let publisher = b.publisher::<Event>("t/r0/event", "r0", PubQos::Data).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..50 {
        publisher.put(&reward(i as f32)).await.unwrap();
    }
    until("50 arrivals", || sub.stats().received.load(Ordering::Relaxed) == 50).await;
    let newest = sub.take().expect("a message");
    assert_eq!(newest.header.seq, 49);
    assert_eq!(newest.header.robot, "r0");
    assert_eq!(newest.msg, reward(49.0));
    assert_eq!(sub.stats().replaced.load(Ordering::Relaxed), 49);
    assert!(sub.take().is_none(), "taken once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lossless_delivers_everything_in_order_through_a_small_queue() {
    let (a, b) = pair().await;
    let sub = a.subscribe_lossless::<Event>("t/r0/event", 4).await.unwrap();
    let publisher = b.publisher::<Event>("t/r0/event", "r0", PubQos::Data).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sender = tokio::spawn(async move {
        for i in 0..200 {
            publisher.put(&reward(i as f32)).await.unwrap();
        }
        publisher
    });
    // A slow consumer: the queue fills and arrivals wait instead of being dropped.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 0..200u64 {
        let r = tokio::time::timeout(Duration::from_secs(10), sub.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.header.seq, i);
    }
    let _ = sender.await.unwrap();
    assert!(
        sub.stats().waited.load(Ordering::Relaxed) > 0,
        "the small queue filled up"
    );
    assert_eq!(sub.stats().dropped(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_payloads_are_counted_and_good_ones_still_arrive() {
    let (a, b) = pair().await;
    let sub = a.subscribe_lossless::<Event>("t/r0/event", 16).await.unwrap();
    let publisher = b.publisher::<Event>("t/r0/event", "r0", PubQos::Data).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    publisher.put(&reward(1.0)).await.unwrap();
    b.session().put("t/r0/event", b"garbage".to_vec()).await.unwrap();
    b.session().put("t/r0/event", b"NB\x09\x04".to_vec()).await.unwrap();
    publisher.put(&reward(2.0)).await.unwrap();
    let first = sub.recv().await.unwrap();
    let second = sub.recv().await.unwrap();
    assert_eq!((first.msg, second.msg), (reward(1.0), reward(2.0)));
    until("2 decode errors", || {
        sub.stats().decode_errors.load(Ordering::Relaxed) == 2
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trace_context_travels_in_the_attachment() {
    let (a, b) = pair().await;
    let sub = a.subscribe_lossless::<Event>("t/r1/event", 4).await.unwrap();
    let publisher = b.publisher::<Event>("t/r1/event", "r1", PubQos::Control).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ctx = TraceContext::new_root();
    publisher.put_traced(&reward(3.0), &ctx).await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), sub.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.trace, Some(ctx));
    assert_eq!(r.key.as_str(), "t/r1/event");
    assert_eq!(r.header.kind, Kind::Event);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_queries_get_typed_replies_and_bad_requests_an_error() {
    let (a, b) = pair().await;
    let q = a.queryable::<ReplayRequest>("t/replay/sample", 4).await.unwrap();
    let server = tokio::spawn(async move {
        while let Some(req) = q.recv().await {
            let batch = ReplayBatch {
                windows: req.msg.batch_size,
                tensors: vec![Tensor {
                    name: "action".into(),
                    shape: vec![req.msg.batch_size],
                    data: vec![0.5; req.msg.batch_size as usize],
                }],
            };
            req.reply("", &batch).await.unwrap();
            if q.stats().decode_errors.load(Ordering::Relaxed) > 0 {
                break;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let req = ReplayRequest {
        batch_size: 3,
        n_obs_steps: 2,
        horizon: 16,
        fresh_fraction: 0.5,
        seed: 1,
    };
    let replies = b
        .get::<ReplayRequest, ReplayBatch>("t/replay/sample", "", &req, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(replies.len(), 1);
    let batch = replies.into_iter().next().unwrap().unwrap();
    assert_eq!(batch.msg.windows, 3);
    assert_eq!(batch.msg.tensors[0].data, vec![0.5; 3]);
    // A request of the wrong kind gets an error reply naming the expected kind.
    let wrong = b
        .get::<Event, ReplayBatch>("t/replay/sample", "", &reward(1.0), Duration::from_secs(5))
        .await
        .unwrap();
    let err = wrong.into_iter().next().unwrap().unwrap_err().to_string();
    assert!(err.contains("ReplayRequest"), "{err}");
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn liveliness_tokens_come_and_go_with_their_actor() {
    let (a, b) = pair().await;
    let token = a.liveliness_token("n1", "sim_robot_r0").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let live = b.live_actors(Duration::from_secs(2)).await.unwrap();
    assert_eq!(live, vec![("n1".to_string(), "sim_robot_r0".to_string())]);
    drop(token);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if b.live_actors(Duration::from_secs(1)).await.unwrap().is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "token still live after drop");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
