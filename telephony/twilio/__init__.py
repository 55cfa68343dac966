"""Twilio Media Streams bridge: TwiML, signature checks, the WebSocket protocol and REST transfer.

Imports nothing from bot/, policies/ or engine/: the bridge hands each call to a callback as a
telephony.bridge.CallBridge.
"""
