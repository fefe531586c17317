//! W3C Web of Things Thing Descriptions (TD 1.1), generated from a kind's schema.
//!
//! Properties are the signals (read-only, observable over Zenoh) and the set-points
//! (writable through `TwinService.SetDesired`); events are the twin's event stream.

use serde_json::{json, Map, Value};

use crate::id::TwinId;
use crate::keys;
use crate::kind::{AssetKind, Sensitivity};

pub const TD_CONTEXT: &str = "https://www.w3.org/2022/wot/td/v1.1";

/// A number property of the TD: what signals and set-points share (name, description,
/// unit, range), followed by the fields of `rest`.
fn number(name: &str, description: &str, unit: &str, min: f64, max: f64, rest: Value) -> Value {
    let mut p = json!({
        "title": name,
        "description": description,
        "type": "number",
        "unit": unit,
        "minimum": min,
        "maximum": max,
    });
    if let (Some(p), Value::Object(rest)) = (p.as_object_mut(), rest) {
        p.extend(rest);
    }
    p
}

/// The Thing Description of twin `id` of `kind`.
pub fn thing_description(id: &TwinId, kind: AssetKind) -> Value {
    let schema = kind.schema();
    let state_href = format!("zenoh:{}", keys::twin_state(id));
    let mut properties = Map::new();
    for s in schema.signals {
        properties.insert(
            s.name.to_owned(),
            number(
                s.name,
                s.description,
                s.unit,
                s.min,
                s.max,
                json!({
                    "readOnly": true,
                    "observable": true,
                    "twinmesh:sampleRateHz": s.rate_hz,
                    "twinmesh:waveform": s.waveform,
                    "twinmesh:sensitivity": match s.sensitivity {
                        Sensitivity::Public => "public",
                        Sensitivity::SiteOnly => "site_only",
                        Sensitivity::Personal => "personal",
                    },
                    "forms": [
                        {
                            "href": format!("zenoh:{}", keys::telemetry(id, s.name)),
                            "contentType": <crate::proto::TelemetryFrame as twinmesh_proto::Wire>::ENCODING,
                            "op": ["observeproperty"],
                        },
                        {
                            "href": state_href,
                            "contentType": <crate::proto::TwinState as twinmesh_proto::Wire>::ENCODING,
                            "op": ["readproperty", "observeproperty"],
                        }
                    ],
                }),
            ),
        );
    }
    for p in schema.properties {
        properties.insert(
            p.name.to_owned(),
            number(
                p.name,
                p.description,
                p.unit,
                p.min,
                p.max,
                json!({
                    "default": p.default,
                    "readOnly": false,
                    "writeOnly": false,
                    "observable": true,
                    "forms": [{
                        "href": "grpc:twinmesh.v1.TwinService/SetDesired",
                        "contentType": "application/grpc+proto",
                        "op": ["writeproperty"],
                    }],
                }),
            ),
        );
    }
    let mut events = Map::new();
    for e in schema.events {
        events.insert(
            (*e).to_owned(),
            json!({
                "title": e,
                "data": {"type": "object"},
                "forms": [{
                    "href": format!("zenoh:{}", keys::twin_events(id)),
                    "contentType": <crate::proto::TwinEvent as twinmesh_proto::Wire>::ENCODING,
                    "subprotocol": "zenoh",
                    "op": ["subscribeevent"],
                }],
            }),
        );
    }
    json!({
        "@context": [TD_CONTEXT, {"twinmesh": "urn:twinmesh:vocab#"}],
        "@type": format!("twinmesh:{kind}"),
        "id": format!("urn:twinmesh:twin:{}:{}", id.site(), id.asset()),
        "title": id.to_string(),
        "description": schema.description,
        "twinmesh:kind": kind.as_str(),
        "securityDefinitions": {"nosec_sc": {"scheme": "nosec"}},
        "security": ["nosec_sc"],
        "properties": properties,
        "actions": {
            "setDesired": {
                "title": "Command a set-point",
                "input": {
                    "type": "object",
                    "properties": {
                        "property": {"type": "string", "enum": schema.properties.iter().map(|p| p.name).collect::<Vec<_>>()},
                        "value": {"type": "number"},
                        "expectedRevision": {"type": "integer"},
                    },
                    "required": ["property", "value"],
                },
                "forms": [{
                    "href": "grpc:twinmesh.v1.TwinService/SetDesired",
                    "contentType": "application/grpc+proto",
                    "op": ["invokeaction"],
                }],
            }
        },
        "events": events,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn td_lists_every_signal_and_set_point() {
        for kind in AssetKind::ALL {
            let id = TwinId::new("site-a", &format!("{}-01", kind.prefix())).unwrap();
            let td = thing_description(&id, kind);
            assert_eq!(td["@context"][0], TD_CONTEXT);
            assert_eq!(td["title"], id.to_string());
            let props = td["properties"].as_object().unwrap();
            let schema = kind.schema();
            assert_eq!(props.len(), schema.signals.len() + schema.properties.len());
            for s in schema.signals {
                assert_eq!(props[s.name]["readOnly"], true, "{kind}.{}", s.name);
                assert_eq!(props[s.name]["unit"], s.unit);
            }
            for p in schema.properties {
                assert_eq!(props[p.name]["readOnly"], false);
                assert_eq!(props[p.name]["maximum"], p.max);
            }
            assert!(td["security"].is_array());
            assert_eq!(td["events"].as_object().unwrap().len(), schema.events.len());
        }
    }

    /// A kind from a Thing Model gets its TD from the model like a built-in one.
    #[test]
    fn td_of_a_custom_kind_comes_from_its_model() {
        let text = include_str!("../../examples/models/compressor.tm.json")
            .replace("\"compressor\"", "\"td_compressor\"")
            .replace(
                "\"twinmesh:rateHz\": 1,\n      \"twinmesh:sensitivity\": \"public\"",
                "\"twinmesh:rateHz\": 1,\n      \"twinmesh:sensitivity\": \"public\",\n      \"twinmesh:resolution\": 0.01",
            );
        let kind = crate::kind::register_text(
            &text,
            "td.tm.json",
            crate::kind::KindSource::File("td.tm.json".into()),
        )
        .unwrap();
        assert_eq!(
            kind.schema()
                .signal("discharge_pressure")
                .unwrap()
                .resolution,
            0.01
        );
        let id = TwinId::new("site-a", "comp-01").unwrap();
        let td = thing_description(&id, kind);
        assert_eq!(td["twinmesh:kind"], "td_compressor");
        assert_eq!(td["@type"], "twinmesh:td_compressor");
        assert_eq!(td["description"], kind.schema().description);
        let p = &td["properties"];
        assert_eq!(p["operator_badges"]["twinmesh:sensitivity"], "personal");
        assert_eq!(p["motor_current"]["twinmesh:sensitivity"], "site_only");
        assert_eq!(p["discharge_pressure"]["maximum"], 16.0);
        assert_eq!(p["discharge_pressure"]["readOnly"], true);
        assert_eq!(
            p["discharge_pressure"]["forms"][0]["href"],
            "zenoh:twinmesh/telemetry/site-a/comp-01/discharge_pressure"
        );
        assert_eq!(p["pressure_limit"]["default"], 10.0);
        assert_eq!(
            td["actions"]["setDesired"]["input"]["properties"]["property"]["enum"],
            serde_json::json!(["pressure_limit"])
        );
        let events: Vec<&String> = td["events"].as_object().unwrap().keys().collect();
        assert_eq!(events, ["alarm", "overpressure"]);
    }
}
