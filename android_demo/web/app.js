// QuantFace browser demo: the packaged model (model/model.json + the model file it names) run by
// ONNX Runtime Web's WebAssembly CPU backend, everything served from this folder (no CDN).
// Pre/post-processing lives in contract.js (mirrors quantface/app_contract.py).
import * as ort from './node_modules/onnxruntime-web/dist/ort.wasm.min.mjs';
import { CONTRACT_VERSION, cropResize, toInput, toRGBA } from './contract.js';

const MODEL_DIR = new URL('./model/', import.meta.url);
const $ = (id) => document.getElementById(id);
const state = { manifest: null, session: null, size: 0 };

// The wasm binary and its loader come from node_modules (npm ci), next to this page.
ort.env.wasm.wasmPaths = new URL('./node_modules/onnxruntime-web/dist/', import.meta.url).href;
// Threads need a cross-origin-isolated page (COOP/COEP headers), which a plain static server is not.
ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;
ort.env.logLevel = 'error';

function setState(name, message) {
  document.body.dataset.state = name; // 'loading' | 'ready' | 'running' | 'done' | 'error' (read by the tests)
  $('status').textContent = message;
  $('status').className = name === 'error' ? 'error' : '';
}

async function sha256Hex(buffer) {
  if (!crypto.subtle) return null; // not a secure context: skip the check
  const digest = await crypto.subtle.digest('SHA-256', buffer);
  return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, '0')).join('');
}

async function fetchOk(url, what) {
  let response;
  try {
    response = await fetch(url, { cache: 'no-cache' });
  } catch (e) {
    throw new Error(`cannot fetch ${what} (${e.message})`);
  }
  if (!response.ok) {
    throw new Error(`no ${what} at ${url.pathname} (HTTP ${response.status}): package one with ` +
      '"quantface package --onnx MODEL.onnx --out DIR --into-web"');
  }
  return response;
}

async function loadModel() {
  setState('loading', 'Loading model…');
  const manifest = await (await fetchOk(new URL('model.json', MODEL_DIR), 'model.json')).json();
  if (manifest.contract.version !== CONTRACT_VERSION) {
    throw new Error(`model.json uses contract version ${manifest.contract.version}; this page implements ` +
      `version ${CONTRACT_VERSION}`);
  }
  const bytes = await (await fetchOk(new URL(manifest.model_file, MODEL_DIR), manifest.model_file)).arrayBuffer();
  const digest = await sha256Hex(bytes);
  if (digest !== null && digest !== manifest.sha256) {
    throw new Error(`${manifest.model_file} does not match the sha256 in model.json (stale copy?)`);
  }
  const t0 = performance.now();
  const session = await ort.InferenceSession.create(new Uint8Array(bytes), {
    executionProviders: ['wasm'],
    graphOptimizationLevel: 'all',
  });
  const loadMs = performance.now() - t0;
  state.manifest = manifest;
  state.session = session;
  state.size = manifest.working_size;
  const q = manifest.quantization;
  $('model').textContent = `${manifest.model_file} · ${(manifest.bytes / 1e6).toFixed(1)} MB · profile ` +
    `${manifest.profile} · ${q.summary} · ${manifest.input.shape.join('×')} · quantface ${manifest.tool_version}`;
  $('pick').disabled = false;
  setState('ready', `Model loaded in ${loadMs.toFixed(0)} ms (ONNX Runtime Web, WebAssembly, ` +
    `${ort.env.wasm.numThreads} thread${ort.env.wasm.numThreads > 1 ? 's' : ''}). Pick a face photo.`);
}

function decodedPixels(bitmap) {
  const canvas = document.createElement('canvas');
  canvas.width = bitmap.width;
  canvas.height = bitmap.height;
  const ctx = canvas.getContext('2d', { willReadFrequently: true });
  ctx.drawImage(bitmap, 0, 0);
  return ctx.getImageData(0, 0, bitmap.width, bitmap.height).data;
}

function show(canvas, rgba, size) {
  canvas.width = size;
  canvas.height = size;
  canvas.getContext('2d').putImageData(new ImageData(rgba, size, size), 0, 0);
}

async function restore(file) {
  const { manifest, session, size } = state;
  setState('running', `Restoring ${file.name}…`);
  const bitmap = await createImageBitmap(file, { colorSpaceConversion: 'none', premultiplyAlpha: 'none' });
  const t0 = performance.now();
  const before = cropResize(decodedPixels(bitmap), bitmap.width, bitmap.height, size);
  const input = new ort.Tensor('float32', toInput(before, size), manifest.input.shape);
  const t1 = performance.now();
  const outputs = await session.run({ [manifest.input.name]: input });
  const t2 = performance.now();
  const after = toRGBA(outputs[manifest.output.name].data, size);
  const t3 = performance.now();
  show($('before'), before, size);
  show($('after'), after, size);
  $('compare').hidden = false;
  const latency = { model_ms: t2 - t1, total_ms: (t1 - t0) + (t3 - t1) };
  window.quantfaceResult = { file: file.name, width: bitmap.width, height: bitmap.height, ...latency };
  $('latency').textContent = `${latency.model_ms.toFixed(0)} ms model · ${latency.total_ms.toFixed(0)} ms with ` +
    `pre/post-processing · wasm CPU`;
  setState('done', `${file.name}: ${bitmap.width}×${bitmap.height} → centre ${size}×${size}. Drag the slider to compare.`);
}

$('pick').addEventListener('change', (event) => {
  const file = event.target.files[0];
  if (!file) return;
  restore(file).catch((e) => setState('error', `Cannot restore ${file.name}: ${e.message}`));
});

$('split').addEventListener('input', (event) => {
  $('after').style.clipPath = `inset(0 0 0 ${event.target.value}%)`;
});

loadModel().catch((e) => setState('error', `Cannot load the model: ${e.message}`));
