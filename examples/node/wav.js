'use strict';
// Minimal WAV reading and writing for the example client: 16-bit PCM and 32-bit float, the two sample encodings
// of the cloak.v1 wire (SAMPLE_ENCODING_INT16, SAMPLE_ENCODING_FLOAT32). The PCM bytes of a WAV file are already
// what the wire wants: interleaved frames, little-endian.

const WAVE_FORMAT_PCM = 1;
const WAVE_FORMAT_IEEE_FLOAT = 3;
const WAVE_FORMAT_EXTENSIBLE = 0xfffe;

/**
 * Parse a WAV file.
 * @param {Buffer} buf the whole file
 * @returns {{sampleRate: number, channels: number, frames: number, encoding: string, pcm: Buffer}}
 *   encoding is the wire enum name: SAMPLE_ENCODING_INT16 or SAMPLE_ENCODING_FLOAT32
 */
function readWav(buf) {
  if (buf.length < 12 || buf.toString('ascii', 0, 4) !== 'RIFF' || buf.toString('ascii', 8, 12) !== 'WAVE') {
    throw new Error('not a RIFF/WAVE file');
  }
  let fmt = null;
  let pcm = null;
  for (let off = 12; off + 8 <= buf.length;) {
    const id = buf.toString('ascii', off, off + 4);
    const size = buf.readUInt32LE(off + 4);
    const body = buf.subarray(off + 8, Math.min(buf.length, off + 8 + size));
    if (id === 'fmt ') {
      let format = body.readUInt16LE(0);
      if (format === WAVE_FORMAT_EXTENSIBLE && body.length >= 26) {
        format = body.readUInt16LE(24); // the first two bytes of the SubFormat GUID
      }
      fmt = { format, channels: body.readUInt16LE(2), sampleRate: body.readUInt32LE(4), bits: body.readUInt16LE(14) };
    } else if (id === 'data') {
      pcm = body;
    }
    off += 8 + size + (size % 2); // chunks are padded to an even size
  }
  if (fmt === null || pcm === null) {
    throw new Error('WAV file without a fmt or data chunk');
  }
  let encoding;
  if (fmt.format === WAVE_FORMAT_PCM && fmt.bits === 16) {
    encoding = 'SAMPLE_ENCODING_INT16';
  } else if (fmt.format === WAVE_FORMAT_IEEE_FLOAT && fmt.bits === 32) {
    encoding = 'SAMPLE_ENCODING_FLOAT32';
  } else {
    throw new Error(`unsupported WAV format ${fmt.format} with ${fmt.bits}-bit samples: ` +
                    'use 16-bit PCM or 32-bit float');
  }
  const frameBytes = fmt.channels * (fmt.bits / 8);
  const frames = Math.floor(pcm.length / frameBytes);
  return { sampleRate: fmt.sampleRate, channels: fmt.channels, frames, encoding,
           pcm: pcm.subarray(0, frames * frameBytes) };
}

/**
 * A WAV file holding `pcm` (interleaved, little-endian) in the given wire encoding.
 * @returns {Buffer}
 */
function writeWav({ sampleRate, channels, encoding, pcm }) {
  const float = encoding === 'SAMPLE_ENCODING_FLOAT32';
  const bytes = float ? 4 : 2;
  const fmt = Buffer.alloc(float ? 18 : 16);
  fmt.writeUInt16LE(float ? WAVE_FORMAT_IEEE_FLOAT : WAVE_FORMAT_PCM, 0);
  fmt.writeUInt16LE(channels, 2);
  fmt.writeUInt32LE(sampleRate, 4);
  fmt.writeUInt32LE(sampleRate * channels * bytes, 8);
  fmt.writeUInt16LE(channels * bytes, 12);
  fmt.writeUInt16LE(bytes * 8, 14); // an 18-byte fmt ends with cbSize = 0
  const chunks = [chunk('fmt ', fmt)];
  if (float) { // non-PCM formats carry a fact chunk with the frame count
    const fact = Buffer.alloc(4);
    fact.writeUInt32LE(pcm.length / (channels * bytes), 0);
    chunks.push(chunk('fact', fact));
  }
  chunks.push(chunk('data', pcm));
  const body = Buffer.concat([Buffer.from('WAVE', 'ascii'), ...chunks]);
  return Buffer.concat([chunkHeader('RIFF', body.length), body]);
}

function chunkHeader(id, size) {
  const h = Buffer.alloc(8);
  h.write(id, 0, 'ascii');
  h.writeUInt32LE(size, 4);
  return h;
}

function chunk(id, body) {
  const parts = [chunkHeader(id, body.length), body];
  if (body.length % 2) parts.push(Buffer.alloc(1));
  return Buffer.concat(parts);
}

module.exports = { readWav, writeWav };
