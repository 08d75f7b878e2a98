//! `slot drop` and `reset`.

use super::*;

pub(super) async fn slot_drop(src: &SourceConfig, force: bool) -> Outcome {
    let catalog = match Catalog::connect(&src.postgres).await {
        Ok(c) => c,
        Err(e) => return Err(Failure::of(&e)),
    };
    let slot = &src.slot;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let info = match catalog.slot(slot).await {
            Ok(Some(info)) => info,
            Ok(None) => {
                return Err(Failure::Failed(format!(
                    "replication slot {slot:?} does not exist"
                )));
            }
            Err(e) => return Err(Failure::of(&e)),
        };
        if info.active {
            let pid = info.active_pid.unwrap_or(0);
            if !force {
                return Err(Failure::Failed(format!(
                    "replication slot {slot:?} is active (pid {pid}): stop the tidemark that streams from it first, or pass --force to end its connection"
                )));
            }
            if std::time::Instant::now() > deadline {
                return Err(Failure::Failed(format!(
                    "replication slot {slot:?} is still active (pid {pid}) after terminating its connection"
                )));
            }
            // The holder may reconnect between the terminate and the drop: loop.
            if let Err(e) = catalog
                .client()
                .execute("SELECT pg_terminate_backend($1)", &[&pid])
                .await
            {
                return Err(Failure::Failed(format!("cannot terminate pid {pid}: {e}")));
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            continue;
        }
        match catalog
            .client()
            .execute("SELECT pg_drop_replication_slot($1)", &[slot])
            .await
        {
            Ok(_) => {
                println!("dropped replication slot {slot:?}");
                return Ok(());
            }
            // Taken again between the check and the drop (55006: object in use).
            Err(e) if e.code().map(|c| c.code()) == Some("55006") && force => continue,
            Err(e) => {
                return Err(Failure::Failed(format!(
                    "cannot drop replication slot {slot:?}: {}",
                    ErrorChain(&e)
                )));
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ResetMode {
    Purge,
    Keep,
}

pub(super) async fn reset(
    src: &SourceConfig,
    nats: &NatsConfig,
    mode: Option<ResetMode>,
    yes: bool,
    force: bool,
) -> Outcome {
    reset_with_reason(src, nats, mode, yes, force, "reset").await
}

pub(super) async fn reset_with_reason(
    src: &SourceConfig,
    nats: &NatsConfig,
    mode: Option<ResetMode>,
    yes: bool,
    force: bool,
    reason: &str,
) -> Outcome {
    let Some(mode) = mode.filter(|_| yes) else {
        return Err(Failure::Usage(format!(
            "reset drops replication slot {:?} and starts the source over from now; changes made before are not sent again. Pass --purge-stream --yes to also delete every event in stream {:?} (consumers must rebuild), or --keep-stream --yes to keep them and mark the discontinuity",
            src.slot, src.stream.name
        )));
    };
    // The slot first: once it is gone, no tidemark can append to the stream.
    let catalog = match Catalog::connect(&src.postgres).await {
        Ok(c) => c,
        Err(e) => return Err(Failure::of(&e)),
    };
    let old_slot = match catalog.slot(&src.slot).await {
        Ok(s) => s,
        Err(e) => return Err(Failure::of(&e)),
    };
    if old_slot.is_some() {
        slot_drop(src, force).await?;
    }
    let client = match provision::connect(nats, "tidemark-reset").await {
        Ok(c) => c,
        Err(e) => return Err(Failure::of(&e)),
    };
    let js = async_nats::jetstream::new(client);
    match mode {
        ResetMode::Purge => match js.get_stream(&src.stream.name).await {
            Ok(mut stream) => match stream.purge().await {
                Ok(p) => {
                    println!(
                        "purged {} events from stream {:?}",
                        p.purged, src.stream.name
                    );
                    // Record where the purge left the stream, so `run` knows the empty
                    // stream is a deliberate fresh start rather than aged-out events.
                    let last = match stream.info().await {
                        Ok(i) => i.state.last_sequence,
                        Err(e) => {
                            return Err(Failure::Failed(format!(
                                "stream info after the purge: {e}"
                            )));
                        }
                    };
                    let recorded =
                        match crate::backfill::Progress::open(&js, &src.name, src.stream.replicas)
                            .await
                        {
                            Ok(p) => p.set_purged_at(last).await,
                            Err(e) => Err(e),
                        };
                    if let Err(e) = recorded {
                        return Err(Failure::of(&e));
                    }
                }
                Err(e) => {
                    return Err(Failure::Failed(format!(
                        "cannot purge stream {:?}: {e}",
                        src.stream.name
                    )));
                }
            },
            Err(_) => println!(
                "stream {:?} does not exist; nothing to purge",
                src.stream.name
            ),
        },
        ResetMode::Keep => {
            // A new slot now, then the marker: its id sorts after every event already
            // stored and before every change the new slot will send.
            let row = match catalog
                .client()
                .query_one(
                    "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
                    &[&src.slot],
                )
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    return Err(Failure::Failed(format!(
                        "cannot create replication slot {:?}: {}",
                        src.slot,
                        ErrorChain(&e)
                    )));
                }
            };
            let start: String = row.get(0);
            let Ok(start) = start.parse::<Lsn>() else {
                return Err(Failure::Failed(format!(
                    "postgres returned a malformed slot LSN {start:?}"
                )));
            };
            let mut stream = match provision::ensure_stream(&js, &src.stream).await {
                Ok(s) => s,
                Err(e) => return Err(Failure::of(&e)),
            };
            let tail = match provision::read_tail(&mut stream, &src.name).await {
                Ok(t) => t,
                Err(e) => return Err(Failure::of(&e)),
            };
            let marker = crate::events::mapping::reset_marker(
                &src.name,
                start,
                old_slot.and_then(|s| s.confirmed_flush),
                tail.last_event.map(|(l, _)| l),
                reason,
            );
            let published = js
                .send_publish(
                    marker.subject.clone(),
                    async_nats::jetstream::message::PublishMessage::build()
                        .payload(marker.payload.into())
                        .message_id(&marker.msg_id)
                        .expected_last_sequence(tail.last_seq),
                )
                .await;
            match published {
                Ok(ack) => match ack.await {
                    Ok(a) => println!(
                        "kept stream {:?}; reset marker {} at sequence {}",
                        src.stream.name, marker.msg_id, a.sequence
                    ),
                    Err(e) => return Err(Failure::Failed(format!("reset marker not stored: {e}"))),
                },
                Err(e) => {
                    return Err(Failure::Failed(format!(
                        "cannot publish the reset marker: {e}"
                    )));
                }
            }
            println!("created replication slot {:?} at {start}", src.slot);
        }
    }
    println!(
        "source {:?} reset: the next run streams changes from the new slot on",
        src.name
    );
    Ok(())
}
