/* Legacy (OLE2) Office documents with macros that run on open. */

rule Office_AutoExec_Macro
{
    meta:
        description = "OLE2 Office document with a VBA macro that runs automatically when opened"
        severity = "medium"
        author = "Sentinel"
    strings:
        $vba = "VBA_PROJECT" wide ascii
        $auto1 = "AutoOpen" nocase ascii
        $auto2 = "Document_Open" nocase ascii
        $auto3 = "Workbook_Open" nocase ascii
        $auto4 = "Auto_Open" nocase ascii
    condition:
        uint32(0) == 0xE011CFD0 and $vba and any of ($auto*)
}
