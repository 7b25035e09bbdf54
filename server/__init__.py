"""The VoiceCloak gRPC server (`cloak serve`): package cloak.v1, resident models, a fair bounded job queue and a
scheduler that runs PGD for several jobs in one batched U-Net call.

    server.config     ServerConfig: flags, defaults and start-up checks (loopback/TLS, token file mode)
    server.wire       the cloak.v1 wire format both sides share: settings both ways, PCM by SampleEncoding
    server.pcm        uploads: header validation (to a server.upload.Upload) and the PCM receiver
    server.codec      PCM bytes <-> float32 samples by encoding name (no protobuf)
    server.upload     the validated upload and its window plan (no protobuf)
    server.events     job and serving states, error kinds, the events streams follow (no protobuf)
    server.jobs       job records and their subscriptions
    server.fairqueue  the round-robin queue between identities and the fair share of running slots
    server.scheduler  admission, the scheduler thread that owns the models, finished-job bookkeeping
    server.worker     the scheduler thread's model work: starting jobs, batched PGD steps, results
    server.events_pb  server.events as cloak.v1 messages and gRPC status codes (the servicer's side)
    server.streams    stream caps, peer identity, the request-stream reader
    server.service    the CloakService servicer (Protect, Attach, Cancel, GetJob, GetServerInfo, EstimateJob)
    server.errors     rich gRPC error statuses (google.rpc details)
    server.auth       bearer-token interceptor (health exempt); named tokens are identities
    server.memory     the memory budget and the per-job peak estimate
    server.guard      cancellation between U-Net blocks (hooks), not only between PGD iterations
    server.metrics    Prometheus metrics
    server.app        CloakServer: wires it all to a grpc.Server with health and reflection; `serve()` runs it
    server.codegen    regenerates server/gen/ from proto/cloak/v1/*.proto (committed, drift-checked)

The scheduler's side (events, jobs, fairqueue, scheduler, worker, codec, upload, memory) imports neither grpcio nor
protobuf nor server.gen, directly or through another server module (tests/test_scheduler.py checks); only
server.events_pb translates its events and states for the wire.
"""
