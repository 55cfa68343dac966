"""Bridges: where a caller's audio enters and leaves (Twilio Media Streams, SIP/RTP, WebRTC).

A bridge hands each call to whoever started it as a telephony.bridge.CallBridge; it never
imports the conversation (bot/), the engine or the policies.
"""
