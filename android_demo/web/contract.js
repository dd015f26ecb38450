// The pre/post-processing contract of quantface/app_contract.py, step for step, with the same
// integer and float32 arithmetic and the same rounding (see that file for the reasoning).
//
//   1. crop    largest centred square: side = min(w, h), left = (w - side) >> 1, top = (h - side) >> 1
//   2. resize  side x side -> S x S by exact integer area averaging, ties to even
//   3. input   NCHW float32 RGB, x = f32(p) / 127.5 - 1
//   4. output  clamp(y, -1, 1); v = f32(f32(y + 1) * 127.5); round half to even; uint8 RGB
//
// Numbers: every integer here stays below 2^53, so JavaScript's doubles hold them exactly; a float32
// operation is computed in double and rounded once with Math.fround, which gives the correctly
// rounded float32 result for + - * / (double has more than 2 * 24 + 2 bits).

export const CONTRACT_VERSION = 1;

/** Step 1: the largest centred square of a width x height picture. */
export function cropBox(width, height) {
  if (width < 1 || height < 1) throw new Error(`empty picture (${width}x${height})`);
  const side = Math.min(width, height);
  return { left: (width - side) >> 1, top: (height - side) >> 1, side };
}

/** For each output cell i: the first source pixel it overlaps and the integer overlap weights
 *  (units of 1/dst source pixel) of the source pixels it covers; they sum to src. */
function areaWeights(src, dst) {
  const cells = [];
  for (let i = 0; i < dst; i++) {
    const lo = i * src;
    const hi = (i + 1) * src;
    const k0 = Math.floor(lo / dst);
    const k1 = Math.ceil(hi / dst); // exclusive
    const weights = [];
    for (let k = k0; k < k1; k++) weights.push(Math.min(hi, (k + 1) * dst) - Math.max(lo, k * dst));
    cells.push({ k0, weights });
  }
  return cells;
}

function divRoundHalfEven(acc, den) {
  const q = Math.floor(acc / den);
  const r = acc - q * den;
  return 2 * r > den || (2 * r === den && q % 2 === 1) ? q + 1 : q;
}

/**
 * Steps 1-2 on RGBA pixels (an ImageData's data: width x height x 4, opaque or composited on white):
 * returns the S x S picture as RGBA bytes (alpha 255), ready for putImageData.
 */
export function cropResize(rgba, width, height, size) {
  const { left, top, side } = cropBox(width, height);
  const out = new Uint8ClampedArray(size * size * 4);
  const cells = areaWeights(side, size);
  const den = side * side;
  const acc = new Float64Array(size * size * 3); // exact integers: at most 255 * side^2
  const row = new Float64Array(size * 3);
  for (let y = 0; y < side; y++) {
    // Output rows i whose cell covers source row y (one or two when shrinking).
    const iLo = Math.floor((y * size) / side);
    const iHi = Math.min(size - 1, Math.floor(((y + 1) * size - 1) / side));
    row.fill(0);
    const base = ((top + y) * width + left) * 4;
    for (let j = 0; j < size; j++) {
      const { k0, weights } = cells[j];
      let r = 0, g = 0, b = 0;
      for (let t = 0; t < weights.length; t++) {
        const p = base + (k0 + t) * 4;
        const w = weights[t];
        const a = rgba[p + 3];
        if (a === 255) {
          r += w * rgba[p]; g += w * rgba[p + 1]; b += w * rgba[p + 2];
        } else { // composite on white, as app_contract.composite_on_white
          r += w * Math.floor((rgba[p] * a + 255 * (255 - a) + 127) / 255);
          g += w * Math.floor((rgba[p + 1] * a + 255 * (255 - a) + 127) / 255);
          b += w * Math.floor((rgba[p + 2] * a + 255 * (255 - a) + 127) / 255);
        }
      }
      row[j * 3] = r; row[j * 3 + 1] = g; row[j * 3 + 2] = b;
    }
    for (let i = iLo; i <= iHi; i++) {
      const c = cells[i];
      const wy = c.weights[y - c.k0];
      if (!(wy > 0)) continue;
      const o = i * size * 3;
      for (let n = 0; n < size * 3; n++) acc[o + n] += wy * row[n];
    }
  }
  for (let n = 0, m = 0; n < size * size * 3; n += 3, m += 4) {
    out[m] = divRoundHalfEven(acc[n], den);
    out[m + 1] = divRoundHalfEven(acc[n + 1], den);
    out[m + 2] = divRoundHalfEven(acc[n + 2], den);
    out[m + 3] = 255;
  }
  return out;
}

/** Step 3: S x S RGBA bytes -> Float32Array (1, 3, S, S) in [-1, 1]. */
export function toInput(rgba, size) {
  const plane = size * size;
  const x = new Float32Array(3 * plane);
  for (let n = 0; n < plane; n++) {
    for (let c = 0; c < 3; c++) x[c * plane + n] = Math.fround(Math.fround(rgba[n * 4 + c] / 127.5) - 1);
  }
  return x;
}

function roundHalfEven(v) {
  const f = Math.floor(v);
  const d = v - f;
  if (d > 0.5) return f + 1;
  if (d < 0.5) return f;
  return f % 2 === 0 ? f : f + 1;
}

/** Step 4: Float32Array (1, 3, S, S) -> S x S RGBA bytes (alpha 255). */
export function toRGBA(y, size) {
  const plane = size * size;
  const out = new Uint8ClampedArray(plane * 4);
  for (let n = 0; n < plane; n++) {
    for (let c = 0; c < 3; c++) {
      const v = Math.min(Math.max(y[c * plane + n], -1), 1);
      out[n * 4 + c] = roundHalfEven(Math.fround(Math.fround(v + 1) * 127.5));
    }
    out[n * 4 + 3] = 255;
  }
  return out;
}
