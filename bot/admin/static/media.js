// Microphone recording to a 16-bit mono WAV Blob, and the WebRTC softphone.

import { api, ApiError } from "./api.js";

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

// getUserMedia's DOMException names, as a sentence an admin can act on
const MIC_ERRORS = {
  NotAllowedError: "Microphone access was denied. Allow the microphone for this site (the icon in the address bar) and call again.",
  SecurityError: "Microphone access was denied. Allow the microphone for this site (the icon in the address bar) and call again.",
  NotFoundError: "No microphone was found. Connect one and call again.",
  NotReadableError: "The microphone is in use by another application or could not be started.",
  OverconstrainedError: "The microphone cannot be used with the requested settings.",
};

export class MicrophoneError extends Error {
  constructor(cause) {
    super(MIC_ERRORS[cause && cause.name] || `The microphone could not be used: ${(cause && cause.message) || cause}`);
    this.name = "MicrophoneError";
    this.cause = cause;
  }
}

// keys the bot takes (telephony/webrtc.py refuses anything else)
export const KEYPAD_KEYS = "123456789*0#";
// a connection "disconnected" this long, or "failed", is carried on by a new one (recover()), for at most
// RECOVER_FOR_MS (the bot carries a lost call on for 60 s; a worker's death is noticed within ~30 s)
const RECOVER_AFTER_MS = 4000;
// the bot sends a frame every 20 ms, silence included: none for this long and its worker may be gone (ICE
// takes 5-10 s more to say "disconnected")
const MEDIA_STALL_MS = 2000;
const RECOVER_RETRY_MS = 2000;
const RECOVER_FOR_MS = 45000;
// a new connection carrying the call on that is not up by then is given up for another (ICE may take 30 s to say
// "failed"); the worker that took it frees the call's leg at its own 20 s connect timeout
const RESUME_CONNECT_MS = 12000;

export class Softphone {
  constructor({ audioEl, onState, onKeyError, onKeypad }) {
    this.audioEl = audioEl;
    this.onKeypad = onKeypad || (() => {});
    this.onState = onState || (() => {});
    this.onKeyError = onKeyError || (() => {});
    this.pc = null;
    this.dc = null;
    this.callId = null;
    this.ended = false;
    this.connected = false;  // media has flowed at least once
    this.offerSdp = null;  // the offer sent to the bot: withdrawn ("rollback") on a hang-up before media flows
    this.recovering = false;  // a new peer connection is being set up to carry the call on (recover())
    this.resumes = 0;  // how many times it was (a new connection that came up)
    this.onPageHide = () => this.end("ended", true);  // tab closed or navigated away mid-call: hang up properly
  }

  async call(policyRef) {
    this.policyRef = policyRef;
    this.onState("getting microphone");
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      // browsers only offer the microphone to https:// pages (and http://localhost)
      throw new MicrophoneError({ name: "SecurityError", message: "this page is not served over https" });
    }
    try {
      this.stream = await navigator.mediaDevices.getUserMedia({ audio: { echoCancellation: true, noiseSuppression: true } });
    } catch (e) {
      throw new MicrophoneError(e);
    }
    if (this.ended) { this.cleanup(); throw new Error("hung up before the call started"); }
    const { iceServers } = await api("/softphone/config");  // the bot's STUN/TURN (none: LAN only)
    this.iceServers = iceServers;
    window.addEventListener("pagehide", this.onPageHide);
    return this.connect(null);
  }

  // One peer connection to the bot: the call's first, or (resume = its call id) a new one carrying the call on
  // after the worker that held it went away. The microphone stays the same.
  async connect(resume) {
    const pc = new RTCPeerConnection({ iceServers: this.iceServers });
    this.pc = pc;
    this.stream.getTracks().forEach((t) => pc.addTrack(t, this.stream));
    // The keypad: aiortc negotiates no telephone-event, so keys go as text on a data channel of this
    // call (it reaches the worker that holds the call); the bot answers each message {ok} or {error}.
    const dc = pc.createDataChannel("dtmf", { ordered: true });
    this.dc = dc;
    // usable once the call's DTLS/SCTP is up (a moment after "connected"), until the call ends
    dc.onopen = () => { if (this.dc === dc && !this.ended) this.onKeypad(true); };
    dc.onclose = () => { if (this.dc === dc) this.onKeypad(false); };
    dc.onmessage = (e) => {
      let reply = null;
      try { reply = JSON.parse(e.data); } catch { /* not ours */ }
      if (reply && reply.error) this.onKeyError(reply.error);
    };
    pc.ontrack = (e) => { this.audioEl.srcObject = e.streams[0] || new MediaStream([e.track]); };
    pc.onconnectionstatechange = () => {
      if (this.pc !== pc || this.ended) return;
      const s = pc.connectionState;
      // "disconnected" is a network blip that ICE may recover from: keep the microphone and the call, shown
      // as reconnecting. If it lasts, or the connection fails, the worker holding the call may have gone
      // away: a new peer connection carries the call on from whichever worker takes it (recover()).
      clearTimeout(this.blipTimer);
      if (s === "connected") {
        if (resume && !pc.wasConnected) this.resumes += 1;
        pc.wasConnected = true;
        this.connected = true;
        this.onState("connected");
      }
      else if (s === "disconnected") {
        this.onState("reconnecting (network interrupted)");
        this.blipTimer = setTimeout(() => { if (this.pc === pc && pc.connectionState === "disconnected") this.recover(); }, RECOVER_AFTER_MS);
      } else if (s === "failed") this.connected && this.callId ? this.recover() : this.end("failed");
      else if (s === "closed") this.end("ended");
      else this.onState(s);
    };
    await pc.setLocalDescription(await pc.createOffer());
    if (!resume) this.onState("gathering network candidates");
    await new Promise((resolve) => {
      if (pc.iceGatheringState === "complete") return resolve();
      const t = setTimeout(resolve, 3000);
      pc.addEventListener("icegatheringstatechange", () => {
        if (pc.iceGatheringState === "complete") { clearTimeout(t); resolve(); }
      });
    });
    if (this.ended) throw new Error("hung up before the call started");
    if (!resume) this.onState("connecting");
    const offerSdp = pc.localDescription.sdp;
    if (!resume) this.offerSdp = offerSdp;
    let answer;
    try {
      answer = await api("/softphone/offer", { method: "POST", json: { sdp: offerSdp, type: "offer", ...this.policyRef, ...(resume ? { resume } : {}) } });
    } catch (e) {
      if (e instanceof ApiError && !resume) this.offerSdp = null;  // refused: there is no call to withdraw
      throw e;
    }
    this.callId = answer.call_id;
    // hung up while the offer was in flight: end() withdrew it, the bot records the call as the caller's
    // hang-up; the page still gets the call id to show that record
    if (this.ended) return answer.call_id;
    await pc.setRemoteDescription({ type: answer.type, sdp: answer.sdp });
    this.watchMedia(pc);
    if (resume) {
      setTimeout(() => {
        if (this.pc === pc && !this.ended && !pc.wasConnected) this.recover();
      }, RESUME_CONNECT_MS);
    }
    // The bot hanging up closes its DTLS session (close_notify): the DTLS transport goes "closed" while
    // the peer connection itself may stay "connected" for a while, microphone still live.
    const dtls = pc.getSenders().map((s) => s.transport).find(Boolean);
    if (dtls) dtls.addEventListener("statechange", () => {
      if (this.pc !== pc) return;
      if (dtls.state === "closed") this.end("ended");
      else if (dtls.state === "failed") this.connected ? this.recover() : this.end("failed");
    });
    return answer.call_id;
  }

  // Inbound RTP packets of a peer connection (0 before any).
  async inboundPackets(pc) {
    try {
      for (const s of (await pc.getStats()).values()) if (s.type === "inbound-rtp" && s.kind === "audio") return s.packetsReceived || 0;
    } catch { /* closed */ }
    return 0;
  }

  // Media that stops flowing once it has flowed: the worker may be gone, carry the call on (recover()).
  watchMedia(pc) {
    let last = -1;
    let since = Date.now();
    const timer = setInterval(async () => {
      if (this.pc !== pc || this.ended) { clearInterval(timer); return; }
      const n = await this.inboundPackets(pc);
      if (n !== last) { last = n; since = Date.now(); return; }
      if (n > 0 && this.connected && !this.recovering && Date.now() - since > MEDIA_STALL_MS) {
        clearInterval(timer);
        this.recover();
      }
    }, 500);
  }

  // The worker holding the call went away (its media stopped answering): offer again naming the call, until a
  // worker carries it on (leg 2+, "Sorry, we were cut off ...") or says it cannot. 409 call_live: the old
  // worker still holds the call (a network blip, or its death not noticed yet): try again a moment later.
  async recover() {
    if (this.recovering || this.ended) return;
    this.recovering = true;
    this.onKeypad(false);
    const old = this.pc;
    this.onState("reconnecting (the bot's worker went away)");
    const deadline = Date.now() + RECOVER_FOR_MS;
    const heard = old ? await this.inboundPackets(old) : 0;
    try {
      while (!this.ended && Date.now() < deadline) {
        if (old && old.connectionState === "connected" && await this.inboundPackets(old) > heard) {
          this.onState("connected");  // only a stall: the worker is there, its media flows again
          this.watchMedia(old);
          return;
        }
        try {
          await this.connect(this.callId);
          if (old) old.close();
          return;
        } catch (e) {
          if (this.pc !== old) { try { this.pc.close(); } catch { /* closed */ } this.pc = old; }
          const kind = e instanceof ApiError && e.detail && e.detail.kind;
          if (kind === "call_over") { this.end("ended"); return; }  // the bot (or the caller) had ended it
          if (!(kind === "call_live" || kind === "state_unavailable" || !(e instanceof ApiError))) {
            this.end("failed");  // not ours, unknown: nothing to carry on
            return;
          }
          await new Promise((r) => setTimeout(r, RECOVER_RETRY_MS));
        }
      }
      if (!this.ended) this.end("failed");
    } finally {
      this.recovering = false;
    }
  }

  // Keys typed on the keypad (one, or a run like "50#") to the bot as DTMF.
  sendKeys(keys) {
    if (!keys || [...keys].some((k) => !KEYPAD_KEYS.includes(k))) throw new Error(`Not a keypad key: ${keys}`);
    if (!this.dc || this.dc.readyState !== "open" || this.ended) throw new Error("The keypad works while the call is connected.");
    this.dc.send(keys);
  }

  hangup() {
    this.end("ended", true);
  }

  // One way out for every ending (hang-up button, the bot hanging up, a failed network): the peer
  // connection is closed and the microphone released, once. byCaller: the admin hung up (button, tab closed).
  end(state, byCaller = false) {
    if (this.ended) return;
    this.ended = true;
    clearTimeout(this.blipTimer);
    window.removeEventListener("pagehide", this.onPageHide);
    this.onKeypad(false);
    if (byCaller && !this.connected && this.offerSdp) {
      // Before media flows, closing the peer connection tells the bot nothing (no BYE, no DTLS close): it
      // would wait out its connect timeout and record error:connect_timeout. Withdraw the offer instead
      // (keepalive: it is sent even when the tab is closing); failing that, the bot's timeout still ends it.
      api("/softphone/offer", { method: "POST", json: { sdp: this.offerSdp, type: "rollback" }, keepalive: true })
        .catch((e) => console.warn("softphone: could not withdraw the offer", e));
    }
    if (this.pc) {
      // Chrome's close() sends neither RTCP BYE nor a DTLS close: the bot heard silence and ended the call
      // 10 s later as "abandoned". Stopping the transceivers first sends the BYE: a caller hang-up, at once.
      for (const t of this.pc.getTransceivers()) { try { t.stop(); } catch { /* already stopped */ } }
      this.pc.close();
    }
    this.cleanup();
    this.onState(state);
  }

  cleanup() {
    if (this.stream) this.stream.getTracks().forEach((t) => t.stop());
    this.stream = null;
    if (this.audioEl) this.audioEl.srcObject = null;
  }
}
