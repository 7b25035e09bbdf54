#!/usr/bin/env node
'use strict';
// Protect a WAV file on a VoiceCloak server (`cloak serve`) from Node, with @grpc/grpc-js and the cloak.v1 proto.
//
//   node protect.js [--server HOST:PORT] [--token-file F] [--settings JSON] [--deadline auto|none|SECONDS]
//                   [--retries N] [--chunk-bytes N] [--quiet] input.wav output.wav
//
// input.wav: 16-bit PCM or 32-bit float; output.wav has the same format, rate, channels and length. --settings is
// a JSON object of cloak.v1.ProtectSettings fields by their proto names, enums by value name, for example
// '{"seed": 7, "iterations": 20, "gender": "GENDER_FEMALE"}'. On success one JSON line goes to stdout.
// Exit codes: 0 ok, 1 failed, 2 invalid request or input, 3 server busy or message too large, 4 deadline.
//
// What it shows of the contract (docs/contract.md): EstimateJob to pick a deadline the server will not refuse;
// the upload in chunks with flow control; JobEvent.heartbeat; google.rpc.Status details from the
// grpc-status-details-bin trailer (BadRequest field paths, RetryInfo, ErrorInfo); retrying RESOURCE_EXHAUSTED
// only when RetryInfo says so; re-attaching after a dropped stream and resuming the download at result_offset.

const crypto = require('crypto');
const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');
const { readWav, writeWav } = require('./wav');

const PROTO_ROOT = process.env.CLOAK_PROTO_ROOT || path.join(__dirname, '..', '..', 'proto');
const CHUNK_BYTES = 64 * 1024; // the server takes up to 1 MiB per chunk; 16-64 KiB stream best

const cloak = grpc.loadPackageDefinition(protoLoader.loadSync('cloak/v1/cloak_service.proto', {
  includeDirs: [PROTO_ROOT], keepCase: true, longs: String, enums: String, defaults: true, oneofs: true,
})).cloak.v1;

// google.rpc.Status and its detail messages, to read the grpc-status-details-bin trailer
const rpcTypes = new protobuf.Root().loadSync(['status.proto', 'error_details.proto'].map(
  (f) => path.join(__dirname, 'protos', 'google', 'rpc', f)), { keepCase: true });
const Status = rpcTypes.lookupType('google.rpc.Status');

class CloakError extends Error {
  constructor(message, exitCode) {
    super(message);
    this.exitCode = exitCode;
  }
}

/** The google.rpc.Status details of a failed call: {badRequest, retryInfo, errorInfo}, each when present. */
function statusDetails(err) {
  const out = {};
  const raw = err.metadata ? err.metadata.get('grpc-status-details-bin') : [];
  if (!raw.length) return out; // none: e.g. gRPC's own message-size RESOURCE_EXHAUSTED
  const status = Status.decode(raw[0]);
  for (const any of status.details) {
    const name = any.type_url.slice(any.type_url.lastIndexOf('/') + 1);
    const type = rpcTypes.lookupType(name);
    const msg = type.toObject(type.decode(any.value), { longs: Number });
    if (name === 'google.rpc.BadRequest') out.badRequest = msg;
    if (name === 'google.rpc.RetryInfo') {
      const d = msg.retry_delay || {};
      out.retrySeconds = (d.seconds || 0) + (d.nanos || 0) / 1e9;
    }
    if (name === 'google.rpc.ErrorInfo') out.errorInfo = msg;
  }
  return out;
}

function parseArgs(argv) {
  const opts = { server: '127.0.0.1:50051', settings: {}, deadline: 'auto', retries: 5, chunkBytes: CHUNK_BYTES,
                 quiet: false, tokenFile: null, files: [] };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) throw new CloakError(`${a} needs a value`, 2);
      return argv[++i];
    };
    if (a === '--server') opts.server = value();
    else if (a === '--token-file') opts.tokenFile = value();
    else if (a === '--settings') opts.settings = JSON.parse(value());
    else if (a === '--deadline') opts.deadline = value();
    else if (a === '--retries') opts.retries = Number(value());
    else if (a === '--chunk-bytes') opts.chunkBytes = Number(value());
    else if (a === '--quiet') opts.quiet = true;
    else if (a.startsWith('--')) throw new CloakError(`unknown option ${a}`, 2);
    else opts.files.push(a);
  }
  if (opts.files.length !== 2) throw new CloakError('usage: node protect.js [options] input.wav output.wav', 2);
  return opts;
}

function sleep(seconds) {
  return new Promise((resolve) => setTimeout(resolve, seconds * 1000));
}

/** Ask the server what the job would take; the deadline the Protect call then gets (null: none). */
function pickDeadline(client, metadata, header, opts, log) {
  if (opts.deadline === 'none') return Promise.resolve({ deadline: null, estimate: null });
  if (opts.deadline !== 'auto') {
    return Promise.resolve({ deadline: new Date(Date.now() + Number(opts.deadline) * 1000), estimate: null });
  }
  const { sha256, ...rest } = header; // EstimateJob needs no checksum: no PCM is sent
  return new Promise((resolve, reject) => {
    client.EstimateJob({ header: rest }, metadata, { deadline: new Date(Date.now() + 30000) }, (err, est) => {
      if (err) return reject(err);
      // proto3 `optional` fields: with oneofs: true, "_protect_seconds" names the field when it is set
      if (est._protect_seconds !== 'protect_seconds') {
        log('server has no time estimate yet (nothing measured since it started): no deadline');
        return resolve({ deadline: null, estimate: est });
      }
      const seconds = 1.5 * (est.protect_seconds + est.backlog_seconds) + 60; // + upload and download
      log(`estimate: ${est.protect_seconds.toFixed(1)} s of protection, ${est.backlog_seconds.toFixed(1)} s of ` +
          `work ahead; deadline in ${seconds.toFixed(0)} s`);
      resolve({ deadline: new Date(Date.now() + seconds * 1000), estimate: est });
    });
  });
}

/** Follow one Protect or Attach stream into `state`; resolves with the Done event. */
function follow(call, state, log, upload) {
  return new Promise((resolve, reject) => {
    let done = null;
    call.on('data', ({ event }) => {
      if (event.job_id) state.jobId = event.job_id;
      if (event.heartbeat) return; // the latest event again, as a sign of life: nothing new
      switch (event.kind) {
        case 'accepted':
          log(`job ${event.job_id} accepted, queue position ${event.accepted.queue_position}`);
          break;
        case 'queued':
          log(`queued at ${event.queued.queue_position}${event.queued.models_loading ? ' (models loading)' : ''}`);
          break;
        case 'started':
          log(`started: ${event.started.windows} window(s) x ${event.started.iterations} iterations`);
          break;
        case 'progress': {
          const p = event.progress;
          log(`window ${p.window + 1}/${p.windows} iteration ${p.iteration}/${p.iterations} ` +
              `(${(100 * p.fraction).toFixed(0)} %, eta ${p.eta_seconds.toFixed(0)} s)`);
          break;
        }
        case 'result_chunk': {
          const offset = Number(event.result_chunk.offset);
          event.result_chunk.pcm.copy(state.result, offset);
          state.received = offset + event.result_chunk.pcm.length;
          break;
        }
        case 'done':
          done = event.done;
          break;
        default:
      }
    });
    call.on('error', reject);
    call.on('end', () => (done ? resolve(done) : reject(new CloakError('stream ended without a result', 1))));
    if (upload) upload(call).catch(reject);
  });
}

/** Send the header, then the PCM in chunks, respecting flow control; then half-close. */
function uploader(header, pcm, chunkBytes) {
  return async (call) => {
    call.write({ header });
    for (let off = 0; off < pcm.length; off += chunkBytes) {
      if (!call.write({ pcm: pcm.subarray(off, off + chunkBytes) })) {
        await new Promise((resolve) => call.once('drain', resolve));
      }
    }
    call.end();
  };
}

async function protect(opts, log) {
  const input = readWav(fs.readFileSync(opts.files[0]));
  const metadata = new grpc.Metadata();
  if (opts.tokenFile) metadata.set('authorization', `Bearer ${fs.readFileSync(opts.tokenFile, 'utf8').trim()}`);
  const client = new cloak.CloakService(opts.server, grpc.credentials.createInsecure(), {
    'grpc.keepalive_time_ms': 60000, // the server allows pings every >= 10 s, also while a job waits
  });
  const header = {
    sample_rate: input.sampleRate, channels: input.channels, frames: input.frames, encoding: input.encoding,
    sha256: crypto.createHash('sha256').update(input.pcm).digest('hex'), settings: opts.settings,
    keep_on_disconnect: true, // a dropped stream does not cancel the job: we re-attach below
    client_name: 'node-example',
  };
  const state = { jobId: null, result: Buffer.alloc(input.pcm.length), received: 0 };
  try {
    const { deadline, estimate } = await pickDeadline(client, metadata, header, opts, log);
    const callOptions = deadline ? { deadline } : {};
    let done = null;
    for (let attempt = 0; done === null; attempt++) {
      try {
        done = await follow(client.Protect(metadata, callOptions), state, log,
                            uploader(header, input.pcm, opts.chunkBytes));
      } catch (err) {
        const details = statusDetails(err);
        if (err.code === grpc.status.RESOURCE_EXHAUSTED && details.retrySeconds !== undefined && !state.jobId &&
            attempt < opts.retries) {
          log(`server busy (${details.errorInfo ? details.errorInfo.reason : 'no reason'}): retrying in ` +
              `${details.retrySeconds} s`);
          await sleep(details.retrySeconds);
          continue;
        }
        if (state.jobId && err.code === grpc.status.UNAVAILABLE) {
          done = await reattach(client, metadata, state, log);
          continue;
        }
        throw err;
      }
    }
    const digest = crypto.createHash('sha256').update(state.result).digest('hex');
    if (digest !== done.sha256) throw new CloakError(`result sha256 ${digest} != the server's ${done.sha256}`, 1);
    fs.writeFileSync(opts.files[1], writeWav({ sampleRate: input.sampleRate, channels: input.channels,
                                               encoding: done.encoding, pcm: state.result }));
    const m = done.metrics;
    if (m.warning) log(`warning: ${m.warning}`);
    return { job_id: state.jobId, sha256: done.sha256, frames: Number(done.frames), encoding: done.encoding,
             output: opts.files[1], snr_db: m.snr_db, linf: m.linf,
             estimated_seconds: estimate && estimate._protect_seconds ? estimate.protect_seconds : null };
  } finally {
    client.close();
  }
}

/** Follow the job again by id after a dropped stream, downloading only what is missing. */
async function reattach(client, metadata, state, log) {
  for (let i = 0; ; i++) {
    await sleep(Math.min(5, 0.5 * 2 ** i));
    log(`stream dropped: re-attaching to ${state.jobId} from byte ${state.received}`);
    try {
      return await follow(client.Attach({ job_id: state.jobId, result_offset: state.received }, metadata),
                          state, log, null);
    } catch (err) {
      if (err.code !== grpc.status.UNAVAILABLE || i >= 4) throw err;
    }
  }
}

/** One line saying what went wrong, and the exit code. */
function describe(err) {
  if (err instanceof CloakError) return [err.message, err.exitCode];
  if (err.code === undefined) return [String(err.message || err), 2]; // e.g. an unreadable input file
  const d = statusDetails(err);
  const code = Object.keys(grpc.status).find((k) => grpc.status[k] === err.code);
  if (err.code === grpc.status.INVALID_ARGUMENT && d.badRequest) {
    const fields = d.badRequest.field_violations.map((v) => v.field).join(', ');
    return [`invalid request: ${fields}: ${err.details}`, 2];
  }
  if (err.code === grpc.status.RESOURCE_EXHAUSTED) {
    if (d.retrySeconds === undefined) {
      return [`RESOURCE_EXHAUSTED without RetryInfo: a message over a gRPC size limit, not retried: ${err.details}`,
              3];
    }
    return [`server busy (${d.errorInfo ? d.errorInfo.reason : ''}), retries used up: ${err.details}`, 3];
  }
  if (err.code === grpc.status.DEADLINE_EXCEEDED) {
    const reason = d.errorInfo ? ` (${d.errorInfo.reason})` : '';
    return [`DEADLINE_EXCEEDED${reason}: ${err.details}`, 4];
  }
  return [`${code}: ${err.details}`, 1];
}

async function main() {
  let opts;
  try {
    opts = parseArgs(process.argv.slice(2));
  } catch (err) {
    process.stderr.write(`protect.js: ${err.message}\n`);
    return 2;
  }
  const log = opts.quiet ? () => {} : (line) => process.stderr.write(`protect.js: ${line}\n`);
  try {
    const summary = await protect(opts, log);
    process.stdout.write(`${JSON.stringify(summary)}\n`);
    return 0;
  } catch (err) {
    const [message, exitCode] = describe(err);
    process.stderr.write(`protect.js: ${message}\n`);
    return exitCode;
  }
}

main().then((code) => { process.exitCode = code; });
