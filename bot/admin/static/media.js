// Microphone recording to a 16-bit mono WAV Blob, and the WebRTC softphone.

import { api } from "./api.js";

function wavBlob(chunks, rate) {
  const n = chunks.reduce((a, c) => a + c.length, 0);
  const buf = new ArrayBuffer(44 + n * 2);
  const v = new DataView(buf);
  const str = (o, s) => { for (let i = 0; i < s.length; i++) v.setUint8(o + i, s.charCodeAt(i)); };
  str(0, "RIFF"); v.setUint32(4, 36 + n * 2, true); str(8, "WAVE");
  str(12, "fmt "); v.setUint32(16, 16, true); v.setUint16(20, 1, true); v.setUint16(22, 1, true);
  v.setUint32(24, rate, true); v.setUint32(28, rate * 2, true); v.setUint16(32, 2, true); v.setUint16(34, 16, true);
  str(36, "data"); v.setUint32(40, n * 2, true);
  let o = 44;
  for (const c of chunks) for (let i = 0; i < c.length; i++, o += 2) v.setInt16(o, Math.max(-1, Math.min(1, c[i])) * 32767, true);
  return new Blob([buf], { type: "audio/wav" });
}

export class Recorder {
  async start() {
    this.stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    this.ctx = new AudioContext();
    const src = this.ctx.createMediaStreamSource(this.stream);
    // ScriptProcessor is deprecated but needs no extra worklet file and works everywhere.
    this.proc = this.ctx.createScriptProcessor(4096, 1, 1);
    this.chunks = [];
    this.proc.onaudioprocess = (e) => this.chunks.push(new Float32Array(e.inputBuffer.getChannelData(0)));
    src.connect(this.proc);
    this.proc.connect(this.ctx.destination);
  }

  async stop() {
    this.proc.disconnect();
    this.stream.getTracks().forEach((t) => t.stop());
    const rate = this.ctx.sampleRate;
    await this.ctx.close();
    return wavBlob(this.chunks, rate);
  }
}

export class Softphone {
  constructor({ audioEl, onState }) {
    this.audioEl = audioEl;
    this.onState = onState || (() => {});
    this.pc = null;
    this.callId = null;
  }

  async call(policyRef) {
    this.onState("getting microphone");
    this.stream = await navigator.mediaDevices.getUserMedia({ audio: { echoCancellation: true, noiseSuppression: true } });
    const { iceServers } = await api("/softphone/config");  // the bot's STUN/TURN (none: LAN only)
    const pc = new RTCPeerConnection({ iceServers });
    this.pc = pc;
    this.stream.getTracks().forEach((t) => pc.addTrack(t, this.stream));
    pc.ontrack = (e) => { this.audioEl.srcObject = e.streams[0] || new MediaStream([e.track]); };
    pc.onconnectionstatechange = () => {
      this.onState(pc.connectionState);
      if (["failed", "closed", "disconnected"].includes(pc.connectionState)) this.cleanup();
    };
    await pc.setLocalDescription(await pc.createOffer());
    this.onState("gathering network candidates");
    await new Promise((resolve) => {
      if (pc.iceGatheringState === "complete") return resolve();
      const t = setTimeout(resolve, 3000);
      pc.addEventListener("icegatheringstatechange", () => {
        if (pc.iceGatheringState === "complete") { clearTimeout(t); resolve(); }
      });
    });
    this.onState("connecting");
    const answer = await api("/softphone/offer", { method: "POST", json: { sdp: pc.localDescription.sdp, type: "offer", ...policyRef } });
    this.callId = answer.call_id;
    await pc.setRemoteDescription({ type: answer.type, sdp: answer.sdp });
    return answer.call_id;
  }

  hangup() {
    if (this.pc) this.pc.close();
    this.cleanup();
    this.onState("ended");
  }

  cleanup() {
    if (this.stream) this.stream.getTracks().forEach((t) => t.stop());
    this.stream = null;
  }
}
