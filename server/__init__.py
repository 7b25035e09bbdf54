"""The VoiceCloak gRPC server (`cloak serve`): package cloak.v1, resident models, a fair bounded job queue and a
scheduler that runs PGD for several jobs in one batched U-Net call.

    server.config     ServerConfig: flags, defaults and start-up checks (loopback/TLS, token file mode)
    server.pcm        wire format: header/settings validation, PCM decoding and encoding
    server.scheduler  the job queue, job records, the scheduler thread that owns the models
    server.service    the CloakService servicer (Protect, Attach, Cancel, GetJob, GetServerInfo)
    server.auth       bearer-token interceptor (health exempt); named tokens are identities
    server.memory     the memory budget and the per-job peak estimate
    server.guard      cancellation between U-Net blocks (hooks), not only between PGD iterations
    server.metrics    Prometheus metrics
    server.app        CloakServer: wires it all to a grpc.Server with health and reflection; `serve()` runs it
    server.codegen    regenerates server/gen/ from proto/cloak/v1/*.proto (committed, drift-checked)

Only server.config and server.cli import without grpcio installed.
"""
